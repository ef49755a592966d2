"""Q&C-style ablation of qcache on a recipe's model (default: the embedded digits DiT), W8A8 at NFC 14 of 50.

    python tools/ablation.py --n 500 --json docs/results/ablation.json [--recipe recipes/digits.yaml]
    python tools/ablation.py --preset W4A8 --nfc 10 --n 500 --weight-clip search --sweep --seeds 5 \
        --json docs/results/ablation_w4a8.json

Rows, each measured against the full-precision model from the same noise (FID-to-FP, PSNR) and against the data
(FID, class accuracy), with its latency ratio (FP sampling time / the row's, measured in this run) and size ratio
(FP safetensors bytes / the row's checkpoint); every row's latency is timed interleaved with the FP model's:

    fp                 full precision, every step
    ptq                the preset (--preset, default W8A8), naive calibration (random over timesteps from an
                       uncached pool), no cache
    rfc                full precision + RFC
    naive              ptq + FORA (the naive stack)
    +tap               calibrated by TAP on a FORA-aware pool, + FORA
    +tap+vc            ... + variance compensation (forced on: vc.enabled true)
    rfc_instead_of_fora  ptq (naive calibration) + RFC, its schedule tuned on the quantized model itself
                       (cache.schedule_on: compressed: RFC applied to the quantized model as is)
    rfc_instead_of_fora+clip  (with --weight-clip search only) the same with the int4 weight clip search run on the
                       naive calibration set: the search's own share, apart from the cache-aware set
    qcache             TAP on an RFC-aware pool (quant.time_groups = --time-groups, quant.weight_clip =
                       --weight-clip) + RFC with the recipe's
                       cache.schedule_on (default fp: the schedule of the FP trajectory) + VC as the recipe says
                       (vc.enabled auto: kept only where it lowers the held-out error; the row's ``vc_info`` has
                       both held-out errors and the decision)

``--sweep`` adds the calibration grid under ``sweep`` (rows) and ``sweep_summary`` (mean and std over ``--seeds``
selection seeds): selector random | kmeans | tap x pool rfc-aware | uncached x observer absmax | percentile, each
row quantized from its own selection and sampled with the FP model's tuned RFC schedule replayed (same NFC for
all, no VC, no latency timing), so only the calibration differs.

The naive pool has as many rows as the cache-aware ones (fewer images, every step). Any recipe works (latent and
text models: images decoded by the VAE, every stage conditioned like the compress pipeline's); FID-to-FP needs the
digits judge, elsewhere it is null and the table's quality column to read is PSNR. A row that fails (or whose
pool or quantized model failed) keeps its error (``"error"``) and the others still run. Heavy at the defaults: run
it alone (``flock /tmp/qcache-cpu.lock``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from common import (
    DIGITS_RECIPE,
    ROW_ERRORS,
    RecipeModel,
    fmt,
    markdown_table,
    quality_key,
    run_cli,
    run_row,
    time_interleaved,
    write_json,
)
from common import log as _log

from qcache.compressed import CompressedModel  # noqa: E402
from qcache.errors import QcacheError  # noqa: E402
from qcache.pipeline import (  # noqa: E402
    build_pool,
    cache_schedule,
    fit_variance_compensation,
    model_bytes,
    quantize_model,
    schedule_model,
    select_calibration,
)
from qcache.quant import checkpoint_bytes, save_quantized  # noqa: E402
from qcache.recipe import CacheConfig  # noqa: E402

ROWS = ("fp", "ptq", "rfc", "naive", "+tap", "+tap+vc", "rfc_instead_of_fora", "qcache")
CLIP_ROW = "rfc_instead_of_fora+clip"  # before qcache, with --weight-clip search only
KEYS = ("config", "nfc", "fid_to_fp", "fid_data", "class_accuracy", "psnr", "latency_ratio", "size_ratio")
PRESETS = ("W8A8", "W4A8")
SELECTORS, POOLS, OBSERVERS = ("random", "kmeans", "tap"), ("rfc", "uncached"), ("absmax", "percentile")


def log(msg: str) -> None:
    _log(msg, err=True)


class Ablation:
    """The rows above on one recipe's model, each against the same FP reference."""

    def __init__(self, args) -> None:
        self.rm = RecipeModel.load(args.recipe, device="cpu")
        recipe = self.rm.recipe
        self.args = args
        self.recipe = replace(recipe, quant=replace(recipe.quant, preset=args.preset),
                              cache=replace(recipe.cache, target_nfc=args.nfc),
                              eval=replace(recipe.eval, n=args.n, latency_samples=args.latency_samples,
                                           latency_repeats=args.repeats))
        self.fp, self.sched, self.parts = self.rm.transformer, self.rm.scheduler_config, self.rm.parts
        self.fp_bytes = model_bytes(self.fp)
        self.rows: list[dict] = []
        self.fora = CacheConfig(policy="fora", target_nfc=args.nfc, warmup=self.recipe.cache.warmup)
        self._products: dict[str, tuple[object, BaseException | None]] = {}
        self._ids = itertools.count()
        self.vc_infos: dict[int, dict] = {}  # id(compressed model) -> its VC decision
        self.sweep_rows: list[dict] = []

    # ---- building blocks ------------------------------------------------------------------------------------
    def product(self, key: str, build: Callable[[], object]):
        """``build()`` once per key; a product that failed fails every row needing it, with the same error."""
        if key not in self._products:
            try:
                self._products[key] = (build(), None)
            except ROW_ERRORS as exc:
                self._products[key] = (None, exc)
        value, exc = self._products[key]
        if exc is not None:
            raise exc
        return value

    def _pool_recipe(self, cache: CacheConfig | None, selector: str, seed: int | None = None):
        cal, steps = self.recipe.calibration, self.recipe.sampling.steps
        seed = cal.seed if seed is None else seed
        if cache is None:  # naive pool: same number of rows, fewer images
            images = math.ceil(cal.pool_images * self.recipe.cache.target_nfc / steps)
            return replace(self.recipe, calibration=replace(cal, cache_aware=False, pool_images=images,
                                                            selector=selector, seed=seed))
        return replace(self.recipe, cache=cache, calibration=replace(cal, cache_aware=True, selector=selector,
                                                                     seed=seed))

    def raw_pool(self, cache: CacheConfig | None):
        """The pool collected with ``cache`` (None: naive, every step of uncached trajectories), once per cache."""
        key = f"pool:{cache.policy if cache is not None else 'uncached'}"

        def build():
            t0 = time.perf_counter()
            pool, info = build_pool(self._pool_recipe(cache, "random"), self.fp, self.sched, parts=self.parts)
            log(f"pool ({'naive' if cache is None else cache.policy}-aware) {len(pool)} rows in "
                f"{time.perf_counter() - t0:.1f}s")
            return pool, info.get("tau")

        return self.product(key, build)

    def pool(self, cache: CacheConfig | None, selector: str, seed: int | None = None):
        """A calibration set: cache-aware pool collected with ``cache`` (None: naive, every step) and a selector."""
        pool, tau = self.raw_pool(cache)
        t0 = time.perf_counter()
        sel = select_calibration(self._pool_recipe(cache, selector, seed), pool)
        log(f"  {selector} picked {len(sel)} of {len(pool)} rows in {time.perf_counter() - t0:.1f}s")
        return sel, tau

    def quantized(self, selection, observer: str | None = None, time_groups: int = 1, weight_clip: str = "none"):
        over = {k: v for k, v in (("observer", observer), ("time_groups", time_groups), ("weight_clip", weight_clip))
                if v not in (None, 1, "none")}
        r = replace(self.recipe, quant=replace(self.recipe.quant, **over)) if over else self.recipe
        model = quantize_model(r, self.fp, selection, parts=self.parts)
        with_dir = Path(self.tmp) / f"q{next(self._ids)}"
        save_quantized(model, with_dir)
        return model, checkpoint_bytes(with_dir)

    def compressed(self, model, cache: CacheConfig | None, vc: bool | str, tau_guess=None) -> CompressedModel:
        """``model`` with ``cache`` tuned on it; ``vc``: True forces VC, "recipe" follows vc.enabled (auto)."""
        r = replace(self.recipe, cache=cache or CacheConfig())
        schedule, _ = cache_schedule(r, schedule_model(r, self.fp, model), self.sched, tau_guess, parts=self.parts)
        cm = CompressedModel(model, self.sched, self.recipe.sampling, r.cache, schedule, parts=self.parts)
        if vc:
            vr = self.recipe if vc == "recipe" else replace(self.recipe, vc=replace(self.recipe.vc, enabled=True))
            cm.vc_factors, _, info = fit_variance_compensation(vr, cm, self.fp, self.sched, with_info=True)
            self.vc_infos[id(cm)] = info
        return cm

    # ---- one row --------------------------------------------------------------------------------------------
    def measure(self, config: str, build: Callable[[], tuple[CompressedModel, int]]) -> dict:
        """The row ``config``: ``build()`` -> (compressed model, checkpoint bytes), sampled on the reference noise,
        timed interleaved with the FP sampler. A failure is recorded in the row."""
        e = self.recipe.eval

        def fill() -> dict:
            cm, size = build()
            t0 = time.perf_counter()
            with cm.sampler() as s:
                out = self.rm.pixels(s.sample(e.n, progress=False))
                took = time.perf_counter() - t0
                fp_latency, latency = time_interleaved([self.fp_sampler, s], min(e.latency_samples, e.n),
                                                       e.latency_repeats)
            return {"nfc": cm.nfc, **self.rm.compare(self.reference, out), "latency_s": latency,
                    "latency_ratio": fp_latency / latency, "fp_latency_s": fp_latency,
                    "size_ratio": self.fp_bytes / size, "size_bytes": size,
                    "schedule": list(cm.schedule.full_steps) if cm.schedule is not None else None,
                    "vc": cm.vc_factors is not None, "sample_s": round(took, 2),
                    **({"vc_info": self.vc_infos[id(cm)]} if id(cm) in self.vc_infos else {})}

        row = run_row({"config": config}, fill, label=config)
        self.rows.append(row)
        log("  ".join(f"{k}={fmt(row.get(k))}" for k in KEYS) + (f"  error={row['error']}" if "error" in row else ""))
        return row

    def run(self, tmp: str) -> list[dict]:
        self.tmp = tmp
        e = self.recipe.eval
        self.fp_sampler = self.rm.sampler()
        t0 = time.perf_counter()
        self.reference = self.rm.pixels(self.fp_sampler.sample(e.n, progress=False))
        log(f"FP reference: {e.n} images in {time.perf_counter() - t0:.1f}s")
        plain = CompressedModel(self.fp, self.sched, self.recipe.sampling, CacheConfig(), parts=self.parts)
        self.measure("fp", lambda: (plain, self.fp_bytes))

        naive_q = lambda: self.product("naive_q", lambda: self.quantized(  # noqa: E731
            self.product("naive_sel", lambda: self.pool(None, "random"))[0]))
        self.measure("ptq", lambda: (self.compressed(naive_q()[0], None, vc=False), naive_q()[1]))

        # a copy: the cache attaches to its transformer, and the FP sampler timed beside it must stay uncached
        rfc_fp = lambda: self.product("rfc_fp", lambda: self.compressed(  # noqa: E731
            copy.deepcopy(self.fp), self.recipe.cache, vc=False))
        self.measure("rfc", lambda: (rfc_fp(), self.fp_bytes))
        rfc_schedule = getattr(self._products.get("rfc_fp", (None,))[0], "schedule", None)
        fp_tau = rfc_schedule.params.get("tau") if rfc_schedule is not None else None

        self.measure("naive", lambda: (self.compressed(naive_q()[0], self.fora, vc=False), naive_q()[1]))

        # the calibration-side rows only: naive calibration stays one group, quanto's own weight scales
        tg, clip = self.args.time_groups, self.args.weight_clip
        tap_q = lambda: self.product("tap_q", lambda: self.quantized(  # noqa: E731
            self.product("fora_sel", lambda: self.pool(self.fora, "tap"))[0], time_groups=tg, weight_clip=clip))
        self.measure("+tap", lambda: (self.compressed(tap_q()[0], self.fora, vc=False), tap_q()[1]))
        self.measure("+tap+vc", lambda: (self.compressed(tap_q()[0], self.fora, vc=True), tap_q()[1]))

        naive_rfc = replace(self.recipe.cache, schedule_on="compressed")  # RFC applied to the quantized model as is
        self.measure("rfc_instead_of_fora", lambda: (self.compressed(naive_q()[0], naive_rfc, vc=False,
                                                                     tau_guess=fp_tau), naive_q()[1]))

        if clip != "none":  # the weight search alone, on the naive calibration set: what the cache-aware set adds
            clip_q = lambda: self.product("naive_clip_q", lambda: self.quantized(  # noqa: E731
                self.product("naive_sel", lambda: self.pool(None, "random"))[0], weight_clip=clip))
            self.measure(CLIP_ROW, lambda: (self.compressed(clip_q()[0], naive_rfc, vc=False, tau_guess=fp_tau),
                                            clip_q()[1]))

        rfc_sel = lambda: self.product("rfc_sel", lambda: self.pool(self.recipe.cache, "tap"))  # noqa: E731
        q = lambda: self.product("rfc_q", lambda: self.quantized(  # noqa: E731
            rfc_sel()[0], time_groups=tg, weight_clip=clip))
        self.measure("qcache", lambda: (self.compressed(q()[0], self.recipe.cache, vc="recipe",
                                                        tau_guess=rfc_sel()[1]), q()[1]))
        if self.args.sweep:
            self.sweep(rfc_schedule)
        return self.rows

    # ---- the calibration grid ---------------------------------------------------------------------------------
    def sweep(self, schedule) -> None:
        """Selector x pool x observer x seed, each on the FP model's RFC schedule replayed (no VC, no timing)."""
        e = self.recipe.eval
        for selector, pool, observer, seed in itertools.product(SELECTORS, POOLS, OBSERVERS, range(self.args.seeds)):
            cache = self.recipe.cache if pool == "rfc" else None

            def fill(selector=selector, cache=cache, observer=observer, seed=seed) -> dict:
                if schedule is None:
                    raise ValueError("the FP model's RFC schedule is missing (the rfc row failed)")
                sel, _ = self.pool(cache, selector, seed)
                model, size = self.quantized(sel, observer, weight_clip=self.args.weight_clip)
                cm = CompressedModel(model, self.sched, self.recipe.sampling, self.recipe.cache, schedule,
                                     parts=self.parts)
                with cm.sampler() as s:
                    out = self.rm.pixels(s.sample(e.n, progress=False))
                return {"nfc": cm.nfc, **self.rm.compare(self.reference, out), "size_ratio": self.fp_bytes / size}

            row = run_row({"config": f"{selector}/{pool}/{observer}/seed{seed}", "selector": selector, "pool": pool,
                           "observer": observer, "seed": seed}, fill, label=f"sweep {selector}/{pool}/{observer}")
            self.sweep_rows.append(row)
            log(f"sweep {row['config']}: fid_to_fp={fmt(row.get('fid_to_fp'))} psnr={fmt(row.get('psnr'))}"
                + (f"  error={row['error']}" if "error" in row else ""))


def sweep_summary(rows: list[dict]) -> list[dict]:
    """Mean and (population) std of FID-to-FP and PSNR over the seeds of every selector x pool x observer."""
    out = []
    for selector, pool, observer in itertools.product(SELECTORS, POOLS, OBSERVERS):
        group = [r for r in rows if (r["selector"], r["pool"], r["observer"]) == (selector, pool, observer)
                 and "error" not in r]
        if not group:
            continue
        entry = {"config": f"{selector}/{pool}/{observer}", "selector": selector, "pool": pool,
                 "observer": observer, "seeds": len(group)}
        for key in ("fid_to_fp", "psnr"):
            vals = [r[key] for r in group if r.get(key) is not None]
            if vals:
                mean = sum(vals) / len(vals)
                entry[f"{key}_mean"] = mean
                entry[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        out.append(entry)
    return out


def summary_table(summary: list[dict]) -> str:
    """The sweep summary as Markdown: mean ± std over the selection seeds."""
    lines = ["| selector | pool | observer | seeds | FID-to-FP | PSNR (dB) |", "|---|---|---|---:|---:|---:|"]

    def pm(s: dict, k: str, d: int) -> str:
        return f"{s[k + '_mean']:.{d}f} ± {s[k + '_std']:.{d}f}" if k + "_mean" in s else "-"

    for s in summary:
        lines.append(f"| {s['selector']} | {s['pool']} | {s['observer']} | {s['seeds']} | {pm(s, 'fid_to_fp', 3)} | "
                     f"{pm(s, 'psnr', 2)} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """The rows as Markdown (failed rows show their error)."""
    keys = list(KEYS) + (["error"] if any("error" in r for r in rows) else [])
    heads = ["config", "NFC", "FID-to-FP", "FID (data)", "class acc.", "PSNR (dB)", "latency ratio",
             "size ratio"] + (["error"] if "error" in keys else [])

    def f(digits: int) -> Callable[[object], str]:
        return lambda v: "-" if v is None else f"{v:.{digits}f}"

    return markdown_table(rows, keys, heads, formats={"fid_to_fp": f(3), "fid_data": f(2), "class_accuracy": f(3),
                                                      "psnr": f(2), "latency_ratio": f(2), "size_ratio": f(2)})


def main() -> None:
    import tempfile

    import datasets

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(DIGITS_RECIPE))
    ap.add_argument("--n", type=int, default=500, help="images per row (same noise as the FP reference)")
    ap.add_argument("--nfc", type=int, default=14, help="target NFC of the cached rows")
    ap.add_argument("--preset", choices=PRESETS, default="W8A8", help="quantization of every quantized row")
    ap.add_argument("--sweep", action="store_true", help="add the selector x pool x observer x seed grid")
    ap.add_argument("--seeds", type=int, default=5, help="selection seeds per cell of the --sweep grid")
    ap.add_argument("--time-groups", type=int, default=1,
                    help="quant.time_groups of the TAP-calibrated rows (+tap, +tap+vc, qcache)")
    ap.add_argument("--weight-clip", choices=("none", "search"), default="none",
                    help="quant.weight_clip of the TAP-calibrated rows and the --sweep grid (int4 weights); with "
                         "search, the row rfc_instead_of_fora+clip runs it on the naive calibration set")
    ap.add_argument("--latency-samples", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--table-from", default=None, help="only print the table of a saved result JSON")
    args = ap.parse_args()
    if args.seeds < 1:
        raise QcacheError(f"--seeds: must be >= 1, got {args.seeds}")
    if not 1 <= args.time_groups <= 64:
        raise QcacheError(f"--time-groups: must be in [1, 64], got {args.time_groups}")
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        print(table(saved["rows"]))
        if saved.get("sweep_summary"):
            print()
            print(summary_table(saved["sweep_summary"]))
        return
    datasets.disable_progress_bars()
    torch.set_grad_enabled(False)
    bench = Ablation(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench.run(tmp)
    result = {"recipe": args.recipe, "n": args.n, "nfc": args.nfc, "preset": args.preset,
              "time_groups": args.time_groups, "weight_clip": args.weight_clip,
              "latency_samples": args.latency_samples,
              "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "seconds": round(time.perf_counter() - t0, 1), "family": bench.parts.family.name,
              "quality": quality_key(rows), "rows": rows,
              "recipe_sections": {k: dataclasses.asdict(getattr(bench.recipe, k))
                                  for k in ("sampling", "cache", "calibration", "quant", "vc")}}
    if args.sweep:
        result.update(sweep=bench.sweep_rows, sweep_summary=sweep_summary(bench.sweep_rows), seeds=args.seeds)
    if args.json:
        write_json(args.json, result)
    print(table(rows))
    if args.sweep:
        print()
        print(summary_table(result["sweep_summary"]))


if __name__ == "__main__":
    run_cli(main)
