"""Cached steps of diffusers' ``BasicTransformerBlock`` in one lean pass (DiT's adaLN-Zero, PixArt's adaLN-single).

With the module hooks alone, a cached step still runs the whole block forward around the forecasts: both
LayerNorm + modulation pairs even when no forecast reads them, a hook round trip per module, and LayerNorm through
PyTorch's affine-free CPU kernel, which is 2-3x slower than the affine kernel on the same data (with weight 1 and
bias 0 the two give bit-identical results). ``BlockFastPath`` takes over a block's forward on cached steps only:

- it computes the block's adaLN modulation (shift, scale, gate) as the block would;
- it builds a cacheable module's input only where the forecast reads it (RFE's magnitude, RCS's watched input);
- it applies each forecast with the block's gate and residual (``ModuleState.cached_step``: the formulas of
  formulas.py, the same the module hooks call).

Full steps, and every step while forecast errors are recorded, run the block's own forward (and so the module
hooks), untouched. The output is bit-identical to the module-hook path (``tests/test_cache_fast_path.py``).

``LeanPath`` is the part of a ``FeatureCache`` that owns these block hooks. It talks to the cache only through the
small ``StepControl`` interface (the step, whether it is full, the RCS decision on the watched input).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook

from . import formulas
from .forecast import ModuleState

HOOK_NAME = "qcache_block_fast_path"
NORM_TYPES = ("ada_norm_zero", "ada_norm_single")


class StepControl(Protocol):
    """What the lean path needs from the cache that owns it."""

    step: int  # the current denoising step
    full: bool  # whether it is a full step (valid once ``decided``)
    decided: bool  # whether this step's full/cached decision is made
    compiled: bool  # cache.compile: cached steps through fused.py
    recording: bool  # forecast errors are being recorded: every block runs its own forward

    def decide(self, watched: torch.Tensor) -> None:
        """Make this step's decision on the watched module's input (RCS); sets ``full`` and ``decided``."""


class _FullAfterAll(Exception):
    """RCS decided on the watched input that this step is full: run the block's own forward instead."""


def layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` as the lean path computes it (``formulas.normalize``)."""
    return formulas.normalize(x, norm.weight, norm.bias, norm.eps)


def eligible(block: torch.nn.Module, names: set[str]) -> bool:
    """Whether ``block`` is a ``BasicTransformerBlock`` the lean path knows, caching exactly its attn1/attn2/ff."""
    from diffusers.models.attention import BasicTransformerBlock

    if not isinstance(block, BasicTransformerBlock) or block.norm_type not in NORM_TYPES:
        return False
    if block.pos_embed is not None or block.only_cross_attention:
        return False
    if block.norm_type == "ada_norm_zero" and block.norm1.emb is None:
        return False
    want = {"attn1", "ff"} | ({"attn2"} if block.attn2 is not None else set())
    return names == want


class BlockFastPath(ModelHook):
    """On one block: its own forward on full steps, the lean forecast-only forward on cached steps."""

    def __init__(self, control: StepControl, workspace: Workspace, states: dict[str, ModuleState],
                 watched: str | None) -> None:
        super().__init__()
        self.control = control
        self.workspace = workspace
        self.states = states  # "attn1" / "attn2" / "ff" -> that module's cache state
        self.watched = watched  # the child ("attn1") whose input RCS watches, when it is in this block

    def new_forward(self, block: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        c = self.control
        own = self.fn_ref.original_forward
        if c.recording or (c.decided and c.full) or (not c.decided and not self.watched):
            return own(hidden_states, *args, **kwargs)
        try:
            return self._cached(block, hidden_states, _block_kwargs(args, kwargs))
        except _FullAfterAll:
            return own(hidden_states, *args, **kwargs)

    def _apply(self, child: str, h: torch.Tensor, gate: torch.Tensor | None, norm: torch.nn.LayerNorm | None,
               scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
        """``h + gate * forecast`` of one cacheable module (``h + forecast`` without a gate), the same operations as
        the block's. The module's input is ``norm(h) * (1 + scale) + shift`` (``norm(h)`` without a scale, ``h``
        itself without a norm); it is built only where the forecast or RCS reads it."""
        c, state = self.control, self.states[child]
        watched = child == self.watched and not c.decided
        if c.compiled and not watched:
            state.check_ready()
            args = None if norm is None else (norm.weight, norm.bias, norm.eps, scale, shift)
            return state.cached_step(c.step, h, gate, inp=h if norm is None else None, compiled=True, norm=args)
        buf = self.workspace.take(h) if h.dtype in (torch.float32, torch.float64) else None
        inp = None
        if watched or state.reads_input:
            # RCS may keep the watched input as its new reference: that one must not live in a workspace buffer
            inp = _module_input(norm, h, scale, shift, None if watched else buf)
        if watched:
            c.decide(inp)
            if c.full:
                raise _FullAfterAll
        return state.cached_step(c.step, h, gate, inp=inp, out=buf)

    def _cached(self, block: torch.nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
        if block.norm_type == "ada_norm_zero":  # DiT
            n1 = block.norm1
            emb = n1.linear(n1.silu(n1.emb(kw["timestep"], kw["class_labels"], hidden_dtype=h.dtype)))
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                c[:, None] for c in emb.chunk(6, dim=1))
            norm_attn, norm_ff = n1.norm, block.norm3
        else:  # PixArt: the timestep embedding comes in already projected to 6 x width
            table = block.scale_shift_table[None] + kw["timestep"].reshape(h.shape[0], 6, -1)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.chunk(6, dim=1)
            norm_attn, norm_ff = block.norm1, block.norm2
        h = self._apply("attn1", h, gate_msa, norm_attn, scale_msa, shift_msa)
        if block.attn2 is not None:  # DiT-style blocks normalise before cross-attention; PixArt's sees h itself
            h = self._apply("attn2", h, None, block.norm2 if block.norm_type == "ada_norm_zero" else None)
        return self._apply("ff", h, gate_mlp, norm_ff, scale_mlp, shift_mlp)


def _module_input(norm: torch.nn.LayerNorm | None, h: torch.Tensor, scale: torch.Tensor | None,
                  shift: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """``norm(h) * (1 + scale) + shift`` as the block computes it (into ``out`` when given and h is not the input)."""
    if norm is None:
        return h
    return formulas.modulate(layer_norm(norm, h), scale, shift, out)


class Workspace:
    """Two reusable activation-sized buffers per (shape, dtype, device) for the lean path: a module's result is
    written into the buffer that does not hold the current hidden state. Fresh tensors of this size would be
    allocated (and, on CPU, page-faulted in) several times per module and step."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, list[torch.Tensor]] = {}

    def take(self, h: torch.Tensor) -> torch.Tensor:
        key = (tuple(h.shape), h.dtype, h.device)
        bufs = self.buffers.setdefault(key, [])
        for b in bufs:
            if b.data_ptr() != h.data_ptr():
                return b
        bufs.append(torch.empty_like(h, memory_format=torch.contiguous_format))
        return bufs[-1]

    def clear(self) -> None:
        self.buffers.clear()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for bufs in self.buffers.values() for b in bufs)


_BLOCK_ARGS = ("attention_mask", "encoder_hidden_states", "encoder_attention_mask", "timestep",
               "cross_attention_kwargs", "class_labels", "added_cond_kwargs")


def _block_kwargs(args: tuple, kwargs: dict) -> dict:
    """``BasicTransformerBlock.forward``'s arguments after ``hidden_states``, by name."""
    out = dict(zip(_BLOCK_ARGS, args))
    out.update(kwargs)
    out.setdefault("timestep", None)
    out.setdefault("class_labels", None)
    return out


class LeanPath:
    """The lean cached-step path of one cache: a ``BlockFastPath`` on every eligible block among the parents of the
    cached modules. ``blocks`` lists them (empty where none is eligible); ``remove()`` detaches them."""

    def __init__(self, control: StepControl, transformer: torch.nn.Module, states: dict[str, ModuleState],
                 watched: str | None) -> None:
        self.workspace = Workspace()
        self.blocks: list[torch.nn.Module] = []
        modules = dict(transformer.named_modules())
        by_block: dict[str, dict[str, str]] = {}
        for name in states:
            parent, _, child = name.rpartition(".")
            by_block.setdefault(parent, {})[child] = name
        for parent, children in by_block.items():
            block = modules.get(parent)
            if block is None or not eligible(block, set(children)):
                continue
            own_watched = next((c for c, full in children.items() if full == watched), None)
            if own_watched not in (None, "attn1"):
                continue  # RCS must be able to decide before anything in the block is forecast
            hook = BlockFastPath(control, self.workspace, {c: states[full] for c, full in children.items()},
                                 own_watched)
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, HOOK_NAME)
            self.blocks.append(block)

    def remove(self, remove_hook: Any) -> None:
        """Detach every block hook (``remove_hook(module, name)``) and free the buffers."""
        for block in self.blocks:
            remove_hook(block, HOOK_NAME)
        self.workspace.clear()
