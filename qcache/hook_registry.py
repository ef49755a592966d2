"""Detaching a diffusers ``ModelHook`` so that the module is left exactly as it was before the first hook."""

from __future__ import annotations

import torch


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """Remove hook ``name`` from ``module``; with no hook left, drop the registry and the instance ``forward`` it
    installed, so the module runs its class's forward again (and pickles, compiles and prints as before)."""
    reg = getattr(module, "_diffusers_hook", None)
    if reg is None:
        return
    reg.remove_hook(name, recurse=False)
    if not reg.hooks:
        del module._diffusers_hook
        fwd = module.__dict__.get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) is type(module).forward:
            del module.__dict__["forward"]
