"""Conditioning computed once per distinct condition and shared across the batch.

A sampling batch repeats conditions: with classifier-free guidance half of it is the null condition, and a class
model sees at most ``num_classes + 1`` distinct labels; every row of a model call has the same timestep. The
conditioning modules (timestep and label/text embedders, adaLN modulation linears) compute each row from the
timestep and the condition alone, so they need only one row per distinct condition. On a cached step these modules
are most of what is left to run (DiT has an embedder and an adaLN linear in every block).

``RowGroups`` says which rows of a batch carry the same condition (``Condition.row_groups``). While
``conditioning_dedup`` is active (the sampler wraps its denoising loop in it), a hook on each conditioning module of
the family (``ModelFamily.row_conditioning``, fnmatch patterns of module names) runs the module on the first row of
each group only and gathers the result back to the whole batch. The result equals the full computation up to float
rounding (a GEMM on fewer rows may sum in another order); with one row per group nothing changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..hook_registry import remove_hook

HOOK_NAME = "qcache_row_dedup"


@dataclass(frozen=True)
class RowGroups:
    """Rows of a batch with the same condition: ``first[g]`` is the first row of group g, ``inverse[i]`` the group
    of row i (both int64, on the batch's device)."""

    first: torch.Tensor
    inverse: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.inverse.shape[0])

    @property
    def groups(self) -> int:
        return int(self.first.shape[0])

    @classmethod
    def from_keys(cls, keys: torch.Tensor) -> RowGroups | None:
        """Groups of equal keys (``keys``: (N,) or (N, K) integer or float); None when every row is distinct."""
        uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
        if uniq.shape[0] == keys.shape[0]:
            return None
        n = keys.shape[0]
        first = torch.full((uniq.shape[0],), n, dtype=torch.long, device=keys.device)
        first.scatter_reduce_(0, inverse, torch.arange(n, device=keys.device), reduce="amin")
        # groups in order of first appearance, so that the deduplicated batch keeps the batch's row order
        order = torch.argsort(first)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.shape[0], device=keys.device)
        return cls(first[order], rank[inverse])


def equal_rows(*tensors: torch.Tensor | None) -> RowGroups | None:
    """Groups of rows (dim 0) that are equal in every given tensor (None entries ignored); None when all differ.

    Rows are grouped by a random projection of their values, then every row is checked to equal its group's first
    row exactly; if any is not (a hash collision), no grouping is returned."""
    parts = [t for t in tensors if t is not None]
    n = parts[0].shape[0]
    gen = torch.Generator(device="cpu").manual_seed(0)
    keys = []
    for t in parts:
        flat = t.reshape(n, -1)
        if not flat.dtype.is_floating_point:
            flat = flat.to(torch.float64)
        r = torch.randn(flat.shape[1], 2, generator=gen, dtype=torch.float64).to(flat.device, flat.dtype)
        keys.append((flat @ r).to(torch.float64))
    groups = RowGroups.from_keys(torch.cat(keys, dim=1))
    if groups is None:
        return None
    for t in parts:
        flat = t.reshape(n, -1)
        if not torch.equal(flat, flat[groups.first][groups.inverse]):
            return None
    return groups


_ACTIVE: contextvars.ContextVar[RowGroups | None] = contextvars.ContextVar("qcache_row_groups", default=None)


def _select(value: Any, groups: RowGroups) -> Any:
    """Every tensor with one row per batch row reduced to one row per group (dicts, lists and tuples walked)."""
    if isinstance(value, torch.Tensor):
        return value[groups.first] if value.dim() and value.shape[0] == groups.rows else value
    if isinstance(value, dict):
        return {k: _select(v, groups) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_select(v, groups) for v in value)
    return value


def _expand(value: Any, groups: RowGroups) -> Any:
    """The inverse of ``_select`` on a module's output: one row per group back to one row per batch row."""
    if isinstance(value, torch.Tensor):
        return value[groups.inverse] if value.dim() and value.shape[0] == groups.groups else value
    if isinstance(value, (list, tuple)):
        return type(value)(_expand(v, groups) for v in value)
    return value


def _has_rows(value: Any, rows: int) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() > 0 and value.shape[0] == rows
    if isinstance(value, dict):
        return any(_has_rows(v, rows) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_rows(v, rows) for v in value)
    return False


class RowDedupHook(ModelHook):
    """On one conditioning module: run it on one row per group of the active ``RowGroups`` and gather back."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        own = self.fn_ref.original_forward
        groups = _ACTIVE.get()
        if groups is None or not _has_rows((args, kwargs), groups.rows):
            return own(*args, **kwargs)
        kwargs = _select(kwargs, groups)
        if kwargs.get("batch_size") == groups.rows:  # PixArt's adaLN-single takes the batch size as an argument
            kwargs["batch_size"] = groups.groups
        return _expand(own(*_select(args, groups), **kwargs), groups)


def row_conditioning_modules(transformer: torch.nn.Module, patterns: tuple[str, ...]) -> list[torch.nn.Module]:
    """The modules whose names match ``patterns``, outermost only (a match inside another is left alone)."""
    out: list[tuple[str, torch.nn.Module]] = []
    for name, module in transformer.named_modules():
        if not name or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if any(name.startswith(parent + ".") for parent, _ in out):
            continue
        out.append((name, module))
    return [m for _, m in out]


@contextlib.contextmanager
def conditioning_dedup(transformer: torch.nn.Module, patterns: tuple[str, ...],
                       groups: RowGroups | None) -> Iterator[None]:
    """While active, the conditioning modules matching ``patterns`` compute one row per group of ``groups``.

    Nothing is attached when ``groups`` is None (every row distinct) or no module matches. The hooks come off on
    exit, leaving each module as it was."""
    modules = row_conditioning_modules(transformer, patterns) if groups is not None else []
    if not modules:
        yield
        return
    attached = []
    try:
        for m in modules:
            reg = HookRegistry.check_if_exists_or_initialize(m)
            if reg.get_hook(HOOK_NAME) is None:
                reg.register_hook(RowDedupHook(), HOOK_NAME)
                attached.append(m)
        token = _ACTIVE.set(groups)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
    finally:
        for m in attached:
            remove_hook(m, HOOK_NAME)
