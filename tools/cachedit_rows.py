"""cache-dit (DBCache, DBCache + its TaylorSeer calibrator) attached to the transformer qcache's ``Sampler`` calls,
so that ``tools/bench_cache.py`` can time and measure it beside qcache's caches on the same sampler object.

cache-dit (``pip install -e '.[compare]'``, pinned in pyproject.toml) normally wraps a diffusers pipeline; here it
takes its transformer-only route: a ``cache_dit.BlockAdapter`` with ``transformer=``, ``blocks=`` (the block list of
qcache's ``CacheLayout``) and ``forward_pattern=`` (``ForwardPattern.Pattern_3``: a DiT block takes and returns the
hidden states only), plus cache-dit's own ``DiTPatchFunctor`` for ``DiTTransformer2DModel`` (it rewrites the
transformer's forward so the final adaLN no longer reaches into ``transformer_blocks[0]``, which cache-dit swaps for
its cached block group during a call). Other transformers use cache-dit's registered adapter for their class.

Each ``CacheDitSetup.attach`` call enables cache-dit, refreshes its context at the start of every batch
(``cache_dit.refresh_context``: a transformer-only context is persistent, and without the refresh the first step of
the next inference still counts as step ``steps`` of the previous one), and on exit disables it
(``cache_dit.disable_cache``) and removes what cache-dit's patch functor leaves on the module (the bound ``forward``,
``_is_patched`` and the ``_norm1_emb`` submodule), so the transformer is exactly as before: same attributes, same
submodules, same ``state_dict``.

Settings: ``Fn_compute_blocks`` 1 (the first block always runs; its residual decides), ``Bn_compute_blocks`` 0
(cache-dit's default), ``max_warmup_steps`` = the bench's ``--warmup``, no cap on (continuous) cached steps
(cache-dit's defaults), CFG in one batch as qcache's sampler calls it (``enable_separate_cfg`` False), TaylorSeer of
cache-dit's default order 1 on the residual.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Iterator
from types import ModuleType

import common  # noqa: F401 - first: puts this checkout's qcache in front of any installed copy
import torch

from qcache.errors import QcacheError
from qcache.sampling import Sampler, SamplerHook, StepState

CACHEDIT_PIN = "1.5.3"  # pyproject.toml's compare extra
PREFIX = "cache-dit"
METHODS = {f"{PREFIX} DBCache": False, f"{PREFIX} DBCache+TaylorSeer": True}  # name -> TaylorSeer calibrator
FN_COMPUTE_BLOCKS = 1
BN_COMPUTE_BLOCKS = 0  # cache-dit's default
TAYLORSEER_ORDER = 1  # cache-dit's default
MISSING = (f"cache-dit rows skipped: cache-dit is not installed (pip install -e '.[compare]' installs "
           f"cache-dit=={CACHEDIT_PIN})")


def is_cachedit(method: str) -> bool:
    """Whether a row's ``method`` is one of cache-dit's."""
    return method.startswith(PREFIX)


def import_cache_dit() -> ModuleType | None:
    """The ``cache_dit`` module, or None when it is not installed."""
    try:
        import cache_dit
    except ImportError:
        return None
    return cache_dit


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """cache-dit logs every enable/disable at INFO/WARNING; the bench attaches it once per timed run."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("cache_dit")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


@dataclasses.dataclass
class CacheDitStats:
    """Cached steps per batch (cache-dit's own count: steps whose blocks after the first were taken from cache)."""

    steps: int
    num_blocks: int
    cached: list[list[int]] = dataclasses.field(default_factory=list)

    def mean_cached(self) -> float:
        return sum(map(len, self.cached)) / len(self.cached) if self.cached else 0.0

    def mean_nfc(self) -> float:
        """Full computations per generation: steps that ran every block (cache-dit's cached-steps count)."""
        return self.steps - self.mean_cached()

    def report(self) -> dict:
        """``nfc`` (full steps, as qcache's rows count them), ``cached_steps`` and ``block_nfc``: the same count
        with the always-computed Fn/Bn blocks of each cached step added in block units."""
        frac = (FN_COMPUTE_BLOCKS + BN_COMPUTE_BLOCKS) / self.num_blocks
        return {"nfc": self.mean_nfc(), "cached_steps": self.mean_cached(),
                "block_nfc": self.mean_nfc() + frac * self.mean_cached(),
                "cached_step_indices": self.cached[-1] if self.cached else []}


class _Attached:
    """What ``CacheDitSetup.attach`` yields: ``stats`` like qcache's attached cache."""

    def __init__(self, stats: CacheDitStats) -> None:
        self.stats = stats


class _Refresh(SamplerHook):
    """A fresh cache-dit context for every batch, its cached steps read at the batch's end."""

    def __init__(self, cd: ModuleType, transformer: torch.nn.Module, stats: CacheDitStats) -> None:
        self.cd, self.transformer, self.stats = cd, transformer, stats

    def on_start(self, state: StepState) -> None:
        self.cd.refresh_context(self.transformer)

    def on_end(self, state: StepState) -> None:
        manager = self.transformer._context_manager
        ctx = manager.get_context(self.transformer._context_names[-1])
        self.stats.cached.append(list(ctx.get_cached_steps()))


def block_list(transformer: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ``ModuleList`` holding qcache's ``CacheLayout.blocks`` (``transformer_blocks`` of a DiT), by name."""
    from qcache.cache.adapters import cache_layout

    blocks = cache_layout(transformer).blocks
    parents = {b.rsplit(".", 1)[0] for b in blocks}
    if not blocks or len(parents) != 1:
        raise QcacheError(f"cache-dit: {type(transformer).__name__} has no single block list")
    name = parents.pop()
    mod = transformer.get_submodule(name)
    if not isinstance(mod, torch.nn.ModuleList):
        raise QcacheError(f"cache-dit: {name} of {type(transformer).__name__} is not a ModuleList")
    return name, mod


@dataclasses.dataclass
class CacheDitSetup:
    """One cache-dit configuration: DBCache with ``threshold`` (``residual_diff_threshold``), the TaylorSeer
    calibrator when ``taylorseer``, ``warmup`` always-full first steps (``max_warmup_steps``)."""

    threshold: float
    taylorseer: bool
    warmup: int

    def configs(self, cd: ModuleType, steps: int):
        """cache-dit's ``DBCacheConfig`` and ``TaylorSeerCalibratorConfig`` (None without the calibrator)."""
        cache = cd.DBCacheConfig(Fn_compute_blocks=FN_COMPUTE_BLOCKS, Bn_compute_blocks=BN_COMPUTE_BLOCKS,
                                 residual_diff_threshold=float(self.threshold), max_warmup_steps=self.warmup,
                                 enable_separate_cfg=False, num_inference_steps=steps)
        cal = cd.TaylorSeerCalibratorConfig(taylorseer_order=TAYLORSEER_ORDER) if self.taylorseer else None
        return cache, cal

    def adapter(self, cd: ModuleType, transformer: torch.nn.Module):
        """cache-dit's ``BlockAdapter`` for ``transformer`` (transformer-only: no pipeline)."""
        if type(transformer).__name__ == "DiTTransformer2DModel":
            from cache_dit.caching.patch_functors import DiTPatchFunctor

            _, blocks = block_list(transformer)
            return cd.BlockAdapter(transformer=transformer, blocks=blocks,
                                   forward_pattern=cd.ForwardPattern.Pattern_3, patch_functor=DiTPatchFunctor(),
                                   check_forward_pattern=True)
        from cache_dit.caching.block_adapters import BlockAdapterRegister

        if not BlockAdapterRegister.is_supported(transformer):
            raise QcacheError(f"cache-dit: no adapter for {type(transformer).__name__}")
        return BlockAdapterRegister.get_adapter(transformer)

    @contextlib.contextmanager
    def attach(self, sampler: Sampler) -> Iterator[_Attached]:
        """cache-dit on ``sampler.transformer`` for the block, taken off again (even on error) with the module
        restored exactly; yields an object whose ``stats`` counts the cached steps of every batch."""
        cd = import_cache_dit()
        if cd is None:
            raise QcacheError(MISSING)
        tr = sampler.transformer
        _, blocks = block_list(tr)
        keys, modules = {tr: set(tr.__dict__), blocks: set(blocks.__dict__)}, dict(tr._modules)
        stats = CacheDitStats(sampler.config.steps, len(blocks))
        cache, cal = self.configs(cd, sampler.config.steps)
        adapter = None
        with quiet():
            try:  # building the adapter already patches the transformer's forward
                adapter = self.adapter(cd, tr)
                cd.enable_cache(adapter, cache_config=copy.deepcopy(cache), calibrator_config=copy.deepcopy(cal))
            except BaseException:
                with contextlib.suppress(Exception):  # the module is restored even when cache-dit's undo fails
                    detach(cd, adapter, tr, keys, modules)
                raise
        try:
            with sampler.extra_hooks(_Refresh(cd, tr, stats)):
                yield _Attached(stats)
        finally:
            with quiet():
                detach(cd, adapter, tr, keys, modules)


def detach(cd: ModuleType, adapter, tr: torch.nn.Module, keys: dict, modules: dict) -> None:
    """``cache_dit.disable_cache`` and then what it leaves: attributes (of the transformer and its block list) and
    submodules that were not there before (the patched ``forward``, ``_is_patched``, ``_norm1_emb``) are removed,
    the submodules put back as they were, in their order."""
    try:
        if adapter is not None:
            cd.disable_cache(adapter)
    finally:
        for mod, before in keys.items():
            for k in set(mod.__dict__) - before:
                del mod.__dict__[k]
        # the original submodules in their original order: cache-dit swaps the block list in and out with
        # ``unittest.mock.patch.object`` on every call, which re-registers it at the end of ``_modules`` (the
        # order of ``named_modules`` and ``state_dict``)
        tr._modules.clear()
        tr._modules.update(modules)


def setups(thresholds: list[float], warmup: int, methods: list[str] | None = None) -> list[tuple[str, CacheDitSetup]]:
    """(method name, setup) of every cache-dit row: each method at each threshold."""
    return [(name, CacheDitSetup(t, ts, warmup)) for name, ts in METHODS.items() if methods is None or name in methods
            for t in thresholds]


def row_fields(setup: CacheDitSetup) -> dict:
    """The settings a cache-dit row records beside its quality and speed."""
    return {"threshold": setup.threshold, "fn_compute_blocks": FN_COMPUTE_BLOCKS,
            "bn_compute_blocks": BN_COMPUTE_BLOCKS, "max_warmup_steps": setup.warmup,
            "taylorseer_order": TAYLORSEER_ORDER if setup.taylorseer else None}


# ---- quality against measured latency ratio ----------------------------------------------------------------------
RATIOS = (2.0, 2.5, 3.0)


def curve_label(row: dict) -> str:
    """A row's curve: its method, with its granularity where the row has one."""
    g = row.get("granularity")
    return row["method"] if g is None else f"{row['method']} ({g})"


def curves(rows: list[dict], key: str) -> dict[str, list[tuple[float, float]]]:
    """Per method (``curve_label``; FP left out), its measured (latency_ratio, ``key``) points sorted by ratio;
    rows that failed or lack either value are left out, points of equal ratio averaged."""
    pts: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        if r["method"] == "FP" or "error" in r or r.get("latency_ratio") is None or r.get(key) is None:
            continue
        pts.setdefault(curve_label(r), {}).setdefault(float(r["latency_ratio"]), []).append(float(r[key]))
    return {m: sorted((x, sum(ys) / len(ys)) for x, ys in by.items()) for m, by in pts.items()}


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation along sorted points; None when ``x`` lies outside them."""
    if not points or x < points[0][0] or x > points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1]  # a single point, at exactly x


def latency_comparison(rows: list[dict], ratios: tuple[float, ...] = RATIOS) -> dict:
    """At each latency ratio, every method's quality interpolated along its measured curve (``curves``; null where
    the ratio is outside it), and qcache's best against cache-dit's best: ``qcache_best_psnr``,
    ``cachedit_best_psnr``, ``psnr_margin_db`` (qcache minus cache-dit; positive: qcache ahead) and, where the rows
    have FID-to-FP, ``qcache_best_fid_to_fp``, ``cachedit_best_fid_to_fp`` and ``fid_to_fp_margin`` (cache-dit minus
    qcache; positive: qcache ahead). Each best is taken per metric, so the two may be different configurations."""
    keys = [k for k in ("psnr", "fid_to_fp") if any(r.get(k) is not None for r in rows if r["method"] != "FP")]
    by_key = {k: curves(rows, k) for k in keys}
    out = {}
    for ratio in ratios:
        d: dict = {"methods": {}}
        for k, cs in by_key.items():
            vals = {m: interpolate(pts, ratio) for m, pts in cs.items()}
            for m, v in vals.items():
                d["methods"].setdefault(m, {})[k] = v
            pick = max if k == "psnr" else min
            q = [(v, m) for m, v in vals.items() if v is not None and not is_cachedit(m)]
            c = [(v, m) for m, v in vals.items() if v is not None and is_cachedit(m)]
            qb, cb = (pick(q) if q else (None, None)), (pick(c) if c else (None, None))
            d.update({f"qcache_best_{k}": qb[0], f"qcache_best_{k}_method": qb[1],
                      f"cachedit_best_{k}": cb[0], f"cachedit_best_{k}_method": cb[1]})
            both = qb[0] is not None and cb[0] is not None
            if k == "psnr":
                d["psnr_margin_db"] = qb[0] - cb[0] if both else None
            else:
                d["fid_to_fp_margin"] = cb[0] - qb[0] if both else None
        out[f"{ratio:g}"] = d
    return out


def plot_latency(rows: list[dict], path: str) -> None:
    """PNG of quality against measured latency ratio, one curve per method (qcache methods across their targets,
    cache-dit's across thresholds): PSNR, and FID-to-FP beside it where the rows have it."""
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    keys = [k for k in ("psnr", "fid_to_fp") if curves(rows, k)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), dpi=120, squeeze=False)
    for ax, k in zip(axes[0], keys):
        for m, pts in curves(rows, k).items():
            ax.plot(*zip(*pts), marker="s" if is_cachedit(m) else "o", linestyle="--" if is_cachedit(m) else "-",
                    label=m)
        ax.set_xlabel("latency ratio (FP time / method time, measured)")
        if k == "psnr":
            ax.set_ylabel("PSNR to full precision, dB (higher is better)")
        else:
            ax.set_ylabel("FID to full precision (lower is better)")
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
