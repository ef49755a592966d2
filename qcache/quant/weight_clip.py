"""Clipping search for 4-bit weights, weighted by the calibration set's activations (``quant.weight_clip: search``).

quanto quantizes int4 weights group-wise (128 inputs per group where the width allows) with min/max scales
(``MaxOptimizer``): one outlier weight stretches its group's 16 levels over a range the other weights do not use.
Shrinking a group's range to ``alpha * [min, max]`` clips the outliers and gives the rest finer steps; which alpha is
best depends on the inputs the layer sees. Following AWQ's clip search (arXiv 2306.00978, Sec. 3), each group takes
the alpha of a grid that minimises its output error on the calibration activations,

    err(alpha) = d G d^T,   d = w - Q_alpha(w) (the group's weights),   G = X_g^T X_g (its inputs' Gram matrix),

which is ``||X_g (w - Q_alpha(w))||^2`` summed over every calibration token. alpha = 1 (quanto's own choice) is in
the grid, so no group ends with a larger calibration error than without the search. This is the one
calibration-side component that acts on the weights: at W4A8 most of the error comes from the int4 weights, which
activation observers and time-grouped scales do not touch (docs/quant.md).

The search runs once, at quantization; it only chooses each group's (scale, shift), which quanto then stores as
usual, so saving and reloading are unchanged and bit-exact.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from optimum.quanto.tensor.optimizers import MaxOptimizer

# clipping ratios tried per group; 1.0 (no clipping) must stay in the grid
GRID: tuple[float, ...] = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 ... 0.5


class GramCollector:
    """Per-group Gram matrices ``X_g^T X_g`` (float64, shape (in/g, g, g)) of the inputs of some Linear modules,
    accumulated by forward pre-hooks over every row the model sees while attached."""

    def __init__(self, modules: dict[str, torch.nn.Module], group_sizes: dict[str, int]) -> None:
        self.modules, self.group_sizes = modules, group_sizes
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def _hook(self, name: str) -> Callable:
        g = self.group_sizes[name]

        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            blocks = x.reshape(x.shape[0], -1, g).transpose(0, 1)  # (in/g, tokens, g)
            gram = torch.bmm(blocks.transpose(1, 2), blocks)
            self.grams[name] = gram if name not in self.grams else self.grams[name] + gram
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]

        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator[GramCollector]:
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def group_length(in_features: int, default: int = 128) -> int:
    """How many inputs share one int4 scale in quanto (``QModuleMixin``'s rule): 128 where the width allows (or
    the largest multiple of 32 below it that divides the width), else the whole row (per-output-channel scales)."""
    g = default
    if in_features <= g:
        return in_features
    while in_features % g != 0 and g > 32:
        g -= 32
    return g if in_features % g == 0 else in_features


def clip_errors(w: torch.Tensor, gram: torch.Tensor, bits: int, grid: tuple[float, ...] = GRID
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Calibration output error of every grouped weight row for every alpha of ``grid``.

    ``w`` (out * in/g, g) are the weights grouped as quanto groups them (axis 0: row r is output r // (in/g), input
    group r % (in/g)); ``gram`` (in/g, g, g). Returns (errors (len(grid), rows), scales, shifts (len(grid), rows, 1))
    with quanto's affine convention (q = round((w + shift) / scale), w' = q * scale - shift)."""
    wd = w.float()  # float32 is plenty to rank the alphas, and 2x faster than float64 here
    gram = gram.float()
    n_groups = gram.shape[0]
    rmin, rmax = wd.amin(1, keepdim=True), wd.amax(1, keepdim=True)
    levels = 2 ** bits - 1
    errs, scales, shifts = [], [], []
    for a in grid:
        lo, hi = rmin * a, rmax * a
        scale = (hi - lo) / levels
        shift = -lo
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round((wd + shift) / safe), 0, levels)
        d = (wd - (q * safe - shift)).reshape(-1, n_groups, w.shape[1]).transpose(0, 1)  # (in/g, out, g)
        err = (torch.bmm(d, gram) * d).sum(-1).transpose(0, 1).reshape(-1)  # d G d^T per (out, group)
        errs.append(torch.where(scale.reshape(-1) > 0, err, torch.full_like(err, float("inf"))))
        scales.append(scale)
        shifts.append(shift)
    return torch.stack(errs), torch.stack(scales), torch.stack(shifts)


class ClipSearchOptimizer(MaxOptimizer):
    """quanto's min/max optimizer with each group's range shrunk by the alpha of ``GRID`` that minimises the
    group's output error on the calibration inputs (``gram``, from ``GramCollector``). Groups whose range is zero
    keep quanto's own scale."""

    def __init__(self, gram: torch.Tensor, grid: tuple[float, ...] = GRID) -> None:
        if 1.0 not in grid:
            raise ValueError("weight clip grid: must contain 1.0 (no clipping)")
        self.gram, self.grid = gram, grid
        self.alphas: torch.Tensor | None = None  # the chosen alpha per group, after quantization

    def optimize(self, base: torch.Tensor, qtype, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = super().optimize(base, qtype, axis)
        if axis != 0 or base.ndim != 2 or base.shape[0] % self.gram.shape[0] or self.gram.shape[1] != base.shape[1]:
            return scale, shift  # not the grouped layout the Gram matrices were collected for
        errs, scales, shifts = clip_errors(base, self.gram, qtype.bits, self.grid)
        least, best = errs.min(0)
        keep = self.grid.index(1.0)
        best = torch.where(torch.isfinite(least), best, torch.full_like(best, keep))
        rows = torch.arange(base.shape[0])
        new_scale = scales[best, rows].to(base.dtype)
        new_shift = shifts[best, rows].to(base.dtype)
        # where alpha = 1 wins, keep quanto's own values bit for bit
        same = (best == keep).reshape(-1, 1)
        self.alphas = torch.tensor(self.grid, dtype=torch.float64)[best]
        return torch.where(same, scale, new_scale), torch.where(same, shift, new_shift)


def clip_targets(model: torch.nn.Module, plan: dict[str, dict]) -> dict[str, torch.nn.Module]:
    """The planned modules the search applies to: Linear layers with int4 weights."""
    return {n: model.get_submodule(n) for n, s in plan.items()
            if s["weights"] == "int4" and isinstance(model.get_submodule(n), torch.nn.Linear)}


def collect_grams(targets: dict[str, torch.nn.Module], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """The per-group input Gram matrices of ``targets`` over one calibration pass (``run()``). Several processes
    (``observers.reduced_across``): each rank's sums are added in rank order, so every rank searches alike."""
    from .observers import _EXCHANGE

    collector = GramCollector(targets, {n: group_length(m.in_features) for n, m in targets.items()})
    with collector.attached():
        run()
    grams = collector.grams
    if _EXCHANGE:
        states = [s for s in _EXCHANGE[-1](grams or None) if s is not None]
        if not states:
            raise ValueError("calibration: no process observed any calibration row")
        grams = {n: functools.reduce(torch.add, (s[n] for s in states)) for n in states[0]}  # rank 0 + 1 + ...
    missing = sorted(set(targets) - set(grams))
    if missing:
        raise ValueError(f"quant.weight_clip: the calibration pass never reached {missing[0]!r}")
    return grams


def install(model: torch.nn.Module, grams: dict[str, torch.Tensor]) -> dict[str, ClipSearchOptimizer]:
    """Give each quanto module named in ``grams`` the clip-search optimizer (used when it is frozen)."""
    optimizers = {n: ClipSearchOptimizer(g) for n, g in grams.items()}
    for n, opt in optimizers.items():
        model.get_submodule(n).optimizer = opt
    return optimizers


def summary(optimizers: dict[str, ClipSearchOptimizer]) -> dict:
    """What the search chose, for the quant map: per module the mean alpha and the share of clipped groups."""
    out = {}
    for n, opt in optimizers.items():
        if opt.alphas is None:
            continue
        out[n] = {"mean_alpha": round(float(opt.alphas.mean()), 4),
                  "clipped": round(float((opt.alphas < 1.0).double().mean()), 4)}
    return {"method": "search", "grid": list(GRID), "modules": out}
