"""Compress a diffusion transformer: quantization + feature caching + variance compensation, into one artifact.

    python -m qcache.compress RECIPE [--out DIR] [--fresh] [--no-progress]

Stages, declared once each in ``STAGE_LIST`` (qcache.stages.Stage: what it reads, build, load); each is kept under
DIR/stages/ with a key derived from what it reads (recipe values, the model's files and scheduler config, upstream
stages), so a re-run after an interruption resumes where it stopped, and a changed recipe, model or noise schedule
recomputes only the stages that read what changed:

    1 pool       tau tuned on the FP model, then the cache-aware calibration pool (the recipe's cache active)
    2 selection  calibration set (random | kmeans | tap)
    3 quantize   optimum-quanto with our observers
    4 schedule   tau for the target NFC on cache.schedule_on's model (FP by default) -> static full-step schedule
    5 vc         variance-compensation factors against the FP trajectory
    6 reference  the FP model's evaluation samples
    7 evaluate   the compressed model on the same noise; latency of both, in one run
    8 sweep      quality against NFC for the report

The recipe, the model, its scheduler config and every file the recipe names are checked before DIR is created.
The artifact is written to DIR/artifact/ through a temporary directory renamed into place; DIR/report.json is a
copy of its report. Load it with ``qcache.load(DIR)``.

Data parallel: ``accelerate launch [--num_processes K] -m qcache.compress RECIPE --out DIR`` (or ``torchrun``)
splits the sampling of the stages across K processes and merges the calibration statistics (qcache.pipeline,
qcache.stages); rank 0 alone locks DIR and writes the stages and the artifact, which are bit-identical to a single
process's (docs/scale.md). Without a launcher nothing changes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import __version__, distributed
from .artifact import write_artifact
from .cli import check_output_path, json_bytes, short_str, write_json
from .compressed import CompressedModel
from .errors import QcacheError
from .families.parts import ModelParts
from .fingerprint import file_fingerprint, model_fingerprint, scheduler_fingerprint
from .models import LoadedModel, load_model, load_parts
from .pipeline import (
    build_pool,
    cache_schedule,
    evaluate_pair,
    fit_variance_compensation,
    has_cache,
    needs_calibration,
    quality_sweep,
    quantize_model,
    reference_samples,
    schedule_model,
    select_calibration,
)
from .recipe import Recipe, load_recipe, recipe_to_dict
from .report import plots, report_markdown, summary_table
from .sampling import SampleSet
from .stages import Stage, StageRun, StageStore, run_stages


@dataclass
class CompressResult:
    """What ``compress`` produced: the in-memory compressed model, its report, and where things were written."""

    compressed: CompressedModel
    report: dict
    artifact: Path
    out: Path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- inputs: everything a run reads is checked before anything is written ----------------------------------------
def check_inputs(recipe: Recipe, loaded: LoadedModel, parts) -> None:
    """Check what the stages read besides the recipe and the model weights: the model's scheduler config (built
    through diffusers, as the sampler builds it) and a replayed ``cache.schedule`` file."""
    from .cache import StaticSchedule
    from .sampling import Sampler, make_scheduler

    sampler = Sampler(loaded.transformer, loaded.scheduler_config, recipe.sampling, conditioner=parts.conditioner)
    try:  # the timesteps exactly as the sampler sets them (FLUX's dynamic shift needs the family's mu)
        extra = sampler.family.timestep_kwargs(loaded.scheduler_config, sampler.sample_shape, loaded.transformer,
                                               steps=recipe.sampling.steps)
        make_scheduler(recipe.sampling.scheduler, loaded.scheduler_config).set_timesteps(recipe.sampling.steps,
                                                                                         **extra)
    except Exception as e:  # diffusers raises ValueError, NotImplementedError, TypeError, ... on a bad config
        first = str(e).splitlines()[0] if str(e) else ""
        raise QcacheError(f"model.source: diffusers refuses its scheduler config for sampling.scheduler "
                          f"{recipe.sampling.scheduler!r}: {type(e).__name__}: {short_str(first)}") from None
    if recipe.cache.schedule is not None and recipe.cache.policy != "none":
        StaticSchedule.load(recipe.cache.schedule).check(sampler)


def stage_inputs(recipe: Recipe, loaded: LoadedModel, parts) -> dict:
    """What the stages read from outside the recipe, as fingerprints for their keys (qcache.fingerprint)."""
    try:
        weights = model_fingerprint(loaded.location or loaded.source)
    except OSError as e:
        raise QcacheError(f"model.source: cannot read {short_str(e.filename)}: {e.strerror}") from None
    try:
        schedule_file = file_fingerprint(recipe.cache.schedule if recipe.cache.policy != "none" else None)
    except OSError as e:
        raise QcacheError(f"cache.schedule: cannot read {short_str(e.filename)}: {e.strerror}") from None
    return {"weights": weights, "scheduler": scheduler_fingerprint(loaded.scheduler_config),
            "condition": parts.conditioner.fingerprint(), "schedule_file": schedule_file}


@contextlib.contextmanager
def _claim(out: Path, key: str) -> Iterator[None]:
    """Create ``out`` (and missing parents) and hold its lock: one compress per output directory at a time.

    An OS error (a regular file in the way, a read-only or virtual file system, a name too long) is one line naming
    ``key``, and removes the directories this call created."""
    created: list[Path] = []
    missing: list[Path] = []
    try:
        if os.path.lexists(out) and not out.is_dir():
            raise QcacheError(f"{key}: {short_str(out)} exists and is not a directory")
        p = out
        while not os.path.lexists(p) and p != p.parent:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        f = open(out / ".lock", "w")
    except OSError as e:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        verb = "cannot create" if missing or not os.path.lexists(out) else "cannot write to"
        raise QcacheError(f"{key}: {verb} {short_str(out)}: {e.strerror or type(e).__name__}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QcacheError(f"{key}: another qcache.compress is writing {short_str(out)}") from None
        yield


def compress(recipe: Recipe, out: str | Path | None = None, progress: bool = True, fresh: bool = False,
             log: Callable[[str], None] = _log) -> CompressResult:
    """Run the whole pipeline for ``recipe``; intermediate products under ``out/stages``, the artifact at
    ``out/artifact``. Returns the in-memory compressed model (bit-identical to what ``qcache.load`` gives back).

    The model, its scheduler config, the conditions and every file the recipe names are checked before the output
    directory is created; an input error is a QcacheError and nothing is written."""
    d = distributed.current()  # several processes: every rank runs this; rank 0 alone touches ``out``
    key = "--out" if out else "output.dir"  # errors name where the path came from
    with d.guard():
        out = check_output_path(out or recipe.output.dir, key, directory=True)
        loaded = load_model(recipe.model)
        parts = load_parts(loaded, recipe.condition)  # bad prompts / a missing VAE
        check_inputs(recipe, loaded, parts)
        inputs = stage_inputs(recipe, loaded, parts)
    if not d.active:
        with _claim(out, key):
            _clean(out, fresh)
            return _compress(recipe, loaded, parts, inputs, out, progress, log)
    with contextlib.ExitStack() as held:
        with d.guard():  # rank 0 claims the directory before any rank starts; the others never write to it
            if d.is_main:
                held.enter_context(_claim(out, key))
                _clean(out, fresh)
        return _compress(recipe, loaded, parts, inputs, out, progress, log if d.is_main else _quiet)


def _quiet(msg: str) -> None:
    pass


def _clean(out: Path, fresh: bool) -> None:
    if fresh:
        shutil.rmtree(out / "stages", ignore_errors=True)
    for stale in out.glob(".artifact.*.partial"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)


# ---- the stages ------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class CompressRun(StageRun):
    """One compress run: the recipe, the FP model and its parts, and what the stages built or reused."""

    recipe: Recipe
    loaded: LoadedModel
    parts: ModelParts
    progress: bool
    calibrate: bool  # some activation is quantized with static ranges: the pool and selection stages run

    @property
    def fp(self) -> torch.nn.Module:
        return self.loaded.transformer

    @property
    def sched(self) -> dict:
        return self.loaded.scheduler_config

    def model(self) -> CompressedModel:
        """The compressed model from the products so far: quantized transformer, schedule, VC factors (once fitted)."""
        vc = self.product("vc") if "vc" in self.infos else None
        return CompressedModel(self.product("quantize"), self.sched, self.recipe.sampling, self.recipe.cache,
                               self.product("schedule"), vc[0] if vc else None, source=self.recipe.model.source,
                               parts=self.parts)


def _num(value, fmt: str) -> str:
    """``value`` formatted, or "n/a" for a metric that is not available for this model (None)."""
    return "n/a" if value is None else format(value, fmt)


def _save_samples(path: Path, s: SampleSet) -> None:
    from safetensors.torch import save_file

    save_file({"images": s.images.contiguous(), "labels": s.labels.contiguous()}, str(path))


def _load_samples(path: Path) -> SampleSet:
    from safetensors.torch import load_file

    d = load_file(str(path))
    return SampleSet(d["images"], d["labels"])


def _load_dataset(path: Path):
    from datasets import load_from_disk

    return load_from_disk(str(path))


def _no_calibration(r: CompressRun) -> str | None:
    if r.calibrate:
        return None
    if r.recipe.quant.backend == "torchao":
        return "quant.backend torchao quantizes activations at run time"
    return f"quant.preset {r.recipe.quant.preset} quantizes no activations"


# Each build gets its temporary stage directory, or None on the ranks other than 0 under several processes
# (qcache.stages): those take their share of the sampling, write nothing and keep only what later stages need.
def _build_pool(r: CompressRun, tmp: Path | None):
    pool, info = build_pool(r.recipe, r.fp, r.sched, r.progress, r.parts)  # tunes tau on FP first (tune_fp_tau)
    if tmp is not None:
        pool.save_to_disk(str(tmp / "pool"))
    return pool, info


def _build_selection(r: CompressRun, tmp: Path | None):
    if tmp is None:  # rank 0 selects; quantize_model hands each rank its rows
        return None, None
    pool = r.product("pool")
    sel = select_calibration(r.recipe, pool)
    sel.save_to_disk(str(tmp / "selection"))
    return sel, {"rows": len(sel), "pool_rows": len(pool), "selector": r.recipe.calibration.selector}


def _build_quantize(r: CompressRun, tmp: Path | None):
    from .quant import checkpoint_bytes, save_quantized

    model = quantize_model(r.recipe, r.fp, r.product("selection") if tmp is not None else None, r.parts)
    if tmp is None:
        return model, None
    save_quantized(model, tmp / "transformer")
    return model, {"preset": r.recipe.quant.preset, "modules": len(model.qcache_quant["modules"]),
                   "bytes": checkpoint_bytes(tmp / "transformer")}


def _load_quantize(r: CompressRun, path: Path, info: dict):
    from .quant import load_quantized

    return load_quantized(path / "transformer", device=r.loaded.device)


def _build_schedule(r: CompressRun, tmp: Path | None):
    tau_guess = (r.infos["pool"] or {}).get("tau")  # the FP model's tau, where the pool stage tuned one
    # one tau search: rank 0 runs it, every rank gets the schedule
    schedule, info = distributed.current().on_main(
        lambda: cache_schedule(r.recipe, schedule_model(r.recipe, r.fp, r.product("quantize")), r.sched, tau_guess,
                               r.parts))
    if tmp is not None and schedule is not None:
        schedule.save(tmp / SCHEDULE_FILE)
    return schedule, {**info, "nfc": schedule.nfc if schedule else r.recipe.sampling.steps,
                      "full_steps": list(schedule.full_steps) if schedule else None}


def _load_schedule(r: CompressRun, path: Path, info: dict):
    from .cache import StaticSchedule

    return StaticSchedule.load(path / SCHEDULE_FILE) if info["full_steps"] else None


def _build_vc(r: CompressRun, tmp: Path | None):
    from safetensors.torch import save_file

    # one denoising batch with per-step least squares over all of it: cut across processes it would give other
    # numbers, so rank 0 fits (and validates) it and every rank gets the factors
    factors, curves, info = distributed.current().on_main(
        lambda: fit_variance_compensation(r.recipe, r.model(), r.fp, r.sched, with_info=True))
    if factors is not None:
        factors = factors.detach().cpu().contiguous()  # as a reused run loads it back
    if tmp is None:
        return (factors, curves), None
    if factors is not None:
        save_file({"factors": factors}, str(tmp / VC_FILE))
    (tmp / "curves.json").write_bytes(json_bytes(curves, indent=None))
    return (factors, curves), info  # info["enabled"]: the factors are kept (vc.enabled auto may drop them)


def _load_vc(r: CompressRun, path: Path, info: dict):
    from safetensors.torch import load_file

    factors = load_file(str(path / VC_FILE))["factors"] if info["enabled"] else None
    return factors, json.loads((path / "curves.json").read_text())


def _build_reference(r: CompressRun, tmp: Path | None):
    samples, quality = reference_samples(r.recipe, r.fp, r.sched, r.progress, r.parts)
    if tmp is None:
        return None, None
    _save_samples(tmp / SAMPLES_FILE, samples)
    return samples, quality


def _build_evaluate(r: CompressRun, tmp: Path | None):
    reference = r.product("reference") if tmp is not None else None
    metrics = evaluate_pair(r.recipe, r.fp, r.sched, r.model(), reference, r.infos["reference"],
                            r.infos["quantize"]["bytes"], r.progress)
    if tmp is None:
        return None, None
    samples = metrics.pop("_samples")
    _save_samples(tmp / SAMPLES_FILE, samples)
    return samples, metrics


def _build_sweep(r: CompressRun, tmp: Path | None):
    reference = r.product("reference") if tmp is not None else None
    points = quality_sweep(r.recipe, r.model(), reference, r.infos["schedule"].get("tau"), progress=r.progress)
    if tmp is None:
        return None, None
    return points, {"points": points}


def _summary_vc(i: dict) -> str:
    if "min" not in i:
        return "disabled"
    held = (f"; held-out {i['heldout_error_without']:.4f} -> {i['heldout_error_with']:.4f}"
            if "heldout_error_with" in i else "")
    return (f"{'kept' if i['enabled'] else 'dropped'} ({i.get('mode', 'on')}), K in [{i['min']:.3f}, "
            f"{i['max']:.3f}], final-step error vs FP {i['final_error_without']:.4f} -> {i['final_error_with']:.4f}"
            + held)


def _summary_evaluate(i: dict) -> str:
    c = i["compressed"]
    return (f"FID to FP {_num(c['fid_to_fp'], '.3f')}, PSNR {c['psnr']:.2f} dB, latency ratio "
            f"{c['latency_ratio']:.2f}x, size ratio {c['size_ratio']:.2f}x")


SCHEDULE_FILE, VC_FILE, SAMPLES_FILE = "cache_schedule.json", "vc_factors.safetensors", "samples.safetensors"
# What each stage reads decides its key: "recipe" lists recipe paths, "inputs" fingerprints from outside the recipe
# (stage_inputs: weights = the model's files, scheduler = its noise schedule, condition = classes or prompts,
# schedule_file = a replayed cache.schedule), "after" the upstream stages whose products it uses.
_SAMPLING = ("sampling", "condition")
STAGE_LIST: list[Stage] = [
    Stage("pool", _build_pool, lambda r, p, i: _load_dataset(p / "pool"),
          lambda i: f"{i['rows']} rows from {i['images']} images (cache {i['cache']})"
                    + (f", tau {i['tau']:.4g} tuned on the FP model" if "probes" in i else ""),
          recipe=("model", *_SAMPLING, "cache", "calibration.pool_images", "calibration.pool_seed",
                  "calibration.cache_aware"),
          inputs=("weights", "scheduler", "condition", "schedule_file"), skip=_no_calibration),
    Stage("selection", _build_selection, lambda r, p, i: _load_dataset(p / "selection"),
          lambda i: f"{i['selector']} picked {i['rows']} of {i['pool_rows']} pool rows",
          recipe=("calibration",), after=("pool",), skip=_no_calibration),
    Stage("quantize", _build_quantize, _load_quantize,
          lambda i: f"{i['preset']}, {i['modules']} modules quantized, {i['bytes'] / 1e6:.2f} MB",
          recipe=("model", "quant", "sampling.guidance_scale", "condition"), inputs=("weights", "condition"),
          after=("selection",)),
    Stage("schedule", _build_schedule, _load_schedule,
          lambda i: f"{i['policy']}, NFC {i['nfc']}" + (f", tau {i['tau']:.4g}" if i.get("tau") else ""),
          recipe=("model", *_SAMPLING, "cache"), inputs=("weights", "scheduler", "condition", "schedule_file"),
          after=("quantize", "pool")),
    Stage("vc", _build_vc, _load_vc, _summary_vc, recipe=("model", *_SAMPLING, "cache", "vc"),
          inputs=("weights", "scheduler", "condition"), after=("quantize", "schedule")),
    Stage("reference", _build_reference, lambda r, p, i: _load_samples(p / SAMPLES_FILE),
          lambda i: f"class accuracy {_num(i['class_accuracy'], '.3f')}, FID vs data {_num(i['fid_data'], '.2f')}",
          recipe=("model", *_SAMPLING, "eval.n"), inputs=("weights", "scheduler", "condition")),
    Stage("evaluate", _build_evaluate, lambda r, p, i: _load_samples(p / SAMPLES_FILE), _summary_evaluate,
          recipe=("model", *_SAMPLING, "cache", "eval"), inputs=("weights", "scheduler", "condition"),
          after=("quantize", "schedule", "vc", "reference")),
    Stage("sweep", _build_sweep, lambda r, p, i: i["points"], lambda i: f"{len(i['points'])} settings",
          recipe=(*_SAMPLING, "cache"), inputs=("scheduler", "condition"), after=("quantize", "schedule", "reference")),
]
STAGES = tuple(s.name for s in STAGE_LIST)


# ---- the run ---------------------------------------------------------------------------------------------------
def _compress(recipe: Recipe, loaded: LoadedModel, parts, inputs: dict, out: Path, progress: bool,
              log: Callable[[str], None]) -> CompressResult:
    import datasets

    datasets.disable_progress_bars()
    t_start = time.perf_counter()
    run = CompressRun(recipe_dict=recipe_to_dict(recipe), inputs=inputs, recipe=recipe, loaded=loaded, parts=parts,
                      progress=progress, calibrate=needs_calibration(recipe, loaded.transformer))
    run_stages(STAGE_LIST, StageStore(out / "stages"), run, log)
    d = distributed.current()
    compressed = report = artifact = None
    with d.guard():  # rank 0 writes; the others wait here, then get its report
        compressed = run.model()
        if d.is_main:
            report = _report(run)
            log("[artifact] writing report, plots and the artifact ...")
            files = plots(report, run.product("reference").images, run.product("evaluate").images)
            report["seconds"] = round(time.perf_counter() - t_start, 1)
            report_json = json_bytes(report, default=str)
            files.update({"report.json": report_json, "report.md": report_markdown(report).encode()})
            artifact = write_artifact(out / "artifact", compressed, recipe, files)
            write_json(out / "report.json", report)
    report, artifact = d.broadcast((report, artifact))
    return CompressResult(compressed, report, artifact, out)


def _calibration_desc(r: CompressRun) -> str:
    recipe = r.recipe
    if r.calibrate:
        sel = r.infos["selection"]
        aware = "cache-aware" if recipe.calibration.cache_aware and has_cache(recipe) else "no cache"
        return f"{recipe.calibration.selector} {sel['rows']} of {sel['pool_rows']} pool rows ({aware})"
    return "none (dynamic activations)" if recipe.quant.backend == "torchao" else "none (weights only)"


def _report(r: CompressRun) -> dict:
    """The run's report (without its total seconds, added once the plots are drawn)."""
    recipe, metrics = r.recipe, r.infos["evaluate"]
    return {
        "qcache_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "setup": {
            "model_source": recipe.model.source, "family": r.parts.family.name,
            "condition": r.parts.conditioner.fingerprint().split(":")[0],
            "decoded_by_vae": r.parts.vae is not None,
            "device": str(r.loaded.device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "quant": recipe.quant.preset,
            "cache": recipe.cache.policy, "calibration": _calibration_desc(r), "steps": recipe.sampling.steps,
            "scheduler": recipe.sampling.scheduler, "guidance_scale": recipe.sampling.guidance_scale,
            "seed": recipe.sampling.seed,
            **({"processes": distributed.current().world_size} if distributed.current().active else {}),
        },
        **{k: metrics[k] for k in ("n", "latency_samples", "latency_repeats", "full_precision", "compressed")},
        "schedule": r.infos["schedule"],
        "vc": r.infos["vc"],
        "error_per_step": r.product("vc")[1],
        "quality_vs_nfc": r.infos["sweep"]["points"],
        "stages": r.timings,
        "recipe": r.recipe_dict,
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m qcache.compress", description=__doc__.splitlines()[0])
    ap.add_argument("recipe", help="path to a YAML recipe")
    ap.add_argument("--out", default=None, help="output directory (default: the recipe's output.dir)")
    ap.add_argument("--fresh", action="store_true", help="ignore the stages of an earlier run and start over")
    ap.add_argument("--n", type=int, default=None, help="evaluation images (default: the recipe's eval.n)")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    if args.n is not None:
        if args.n < 2:
            raise QcacheError(f"--n: must be >= 2 (FID needs two samples), got {args.n}")
        recipe = replace(recipe, eval=replace(recipe.eval, n=args.n))
    torch.set_grad_enabled(False)
    result = compress(recipe, args.out, progress=not args.no_progress, fresh=args.fresh)
    if not distributed.current().is_main:
        return
    print(summary_table(result.report))
    print(f"artifact: {result.artifact}  (report: {result.out / 'report.json'}, "
          f"{result.report['seconds']:.0f}s)")


if __name__ == "__main__":
    distributed.main(main)  # run_cli; one error line for all processes under accelerate launch / torchrun
