"""Compress a diffusion transformer: quantization + feature caching + variance compensation, into one artifact.

    python -m qcache.compress RECIPE [--out DIR] [--fresh] [--no-progress]

Stages (each kept under DIR/stages/, so a re-run after an interruption resumes where it stopped, and a changed
recipe recomputes only the stages that depend on what changed):

    1 pool       cache-aware calibration pool (FP weights, the recipe's cache active)
    2 selection  calibration set (random | kmeans | tap)
    3 quantize   optimum-quanto with our observers
    4 schedule   tau for the target NFC on the quantized model -> static full-step schedule
    5 vc         variance-compensation factors against the FP trajectory
    6 reference  the FP model's evaluation samples
    7 evaluate   the compressed model on the same noise; latency of both, in one run
    8 sweep      quality against NFC for the report

The artifact is written to DIR/artifact/ through a temporary directory renamed into place; DIR/report.json is a
copy of its report. Load it with ``qcache.load(DIR)``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import __version__
from .artifact import write_artifact
from .cli import check_output_path, run_cli, write_json
from .compressed import CompressedModel
from .errors import QcacheError
from .models import load_model, load_parts
from .pipeline import (build_pool, cache_schedule, evaluate_pair, fit_variance_compensation, has_cache,
                       needs_calibration, quality_sweep, quantize_model, reference_samples, select_calibration)
from .recipe import Recipe, load_recipe, recipe_to_dict
from .report import plots, report_markdown, summary_table
from .sampling import SampleSet
from .stages import StageStore, stage_key

STAGES = ("pool", "selection", "quantize", "schedule", "vc", "reference", "evaluate", "sweep")


@dataclass
class CompressResult:
    """What ``compress`` produced: the in-memory compressed model, its report, and where things were written."""

    compressed: CompressedModel
    report: dict
    artifact: Path
    out: Path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _exclusive(out: Path, key: str = "--out") -> Iterator[None]:
    """One compress per output directory at a time."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QcacheError(f"{key}: another qcache.compress is writing {out}") from None
        yield


def _save_samples(path: Path, s: SampleSet) -> None:
    from safetensors.torch import save_file

    save_file({"images": s.images.contiguous(), "labels": s.labels.contiguous()}, str(path))


def _load_samples(path: Path) -> SampleSet:
    from safetensors.torch import load_file

    d = load_file(str(path))
    return SampleSet(d["images"], d["labels"])


def compress(recipe: Recipe, out: str | Path | None = None, progress: bool = True, fresh: bool = False,
             log: Callable[[str], None] = _log) -> CompressResult:
    """Run the whole pipeline for ``recipe``; intermediate products under ``out/stages``, the artifact at
    ``out/artifact``. Returns the in-memory compressed model (bit-identical to what ``qcache.load`` gives back)."""
    key = "--out" if out else "output.dir"  # errors name where the path came from
    out = check_output_path(out or recipe.output.dir, key, directory=True)
    loaded = load_model(recipe.model)  # a bad model source fails before anything is written
    parts = load_parts(loaded, recipe.condition)  # so do bad prompts / a missing VAE
    with _exclusive(out, key):
        if fresh:
            shutil.rmtree(out / "stages", ignore_errors=True)
        for stale in out.glob(".artifact.*.partial"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        return _compress(recipe, loaded, parts, out, progress, log)


def _num(value, fmt: str) -> str:
    """``value`` formatted, or "n/a" for a metric that is not available for this model (None)."""
    return "n/a" if value is None else format(value, fmt)


def _compress(recipe: Recipe, loaded, parts, out: Path, progress: bool, log: Callable[[str], None]) -> CompressResult:
    import datasets
    from datasets import load_from_disk
    from safetensors.torch import load_file, save_file

    from .quant import checkpoint_bytes, load_quantized, save_quantized

    datasets.disable_progress_bars()
    t_start = time.perf_counter()
    store = StageStore(out / "stages")
    R = recipe_to_dict(recipe)
    fp, sched, device = loaded.transformer, loaded.scheduler_config, loaded.device
    timings: dict[str, dict] = {}
    box: dict = {}  # products built in this run, so they are not read back from disk

    def run(i: int, name: str, key: str, build: Callable[[Path], dict | None], summary: Callable[[dict], str]):
        log(f"[{i}/{len(STAGES)}] {name} ...")
        res = store.run(name, key, build)
        timings[name] = {"seconds": round(res.seconds, 2), "reused": res.reused}
        how = "reused from an earlier run" if res.reused else f"{res.seconds:.1f}s"
        log(f"[{i}/{len(STAGES)}] {name}: {summary(res.info)} ({how})")
        return res

    cond = parts.conditioner.fingerprint()  # the conditions every sampling stage uses (prompts, classes)
    # 1-2: calibration data (only when some activation is quantized)
    k_pool = stage_key(model=R["model"], sampling=R["sampling"], cache=R["cache"], condition=cond,
                       pool={k: R["calibration"][k] for k in ("pool_images", "pool_seed", "cache_aware")})
    k_sel = stage_key(pool=k_pool, calibration=R["calibration"])
    selection, tau_guess = None, None
    calibrate = needs_calibration(recipe, fp)
    if calibrate:
        def build_pool_stage(tmp: Path) -> dict:
            pool, info = build_pool(recipe, fp, sched, progress, parts)
            pool.save_to_disk(str(tmp / "pool"))
            box["pool"] = pool
            return info

        res = run(1, "pool", k_pool, build_pool_stage,
                  lambda i: f"{i['rows']} rows from {i['images']} images (cache {i['cache']})")
        pool = box["pool"] if "pool" in box else load_from_disk(str(res.path / "pool"))
        tau_guess = res.info.get("tau")

        def build_selection_stage(tmp: Path) -> dict:
            sel = select_calibration(recipe, pool)
            sel.save_to_disk(str(tmp / "selection"))
            box["selection"] = sel
            return {"rows": len(sel), "pool_rows": len(pool), "selector": recipe.calibration.selector}

        res = run(2, "selection", k_sel, build_selection_stage,
                  lambda i: f"{i['selector']} picked {i['rows']} of {i['pool_rows']} pool rows")
        selection = box["selection"] if "selection" in box else load_from_disk(str(res.path / "selection"))
        calib_desc = (f"{recipe.calibration.selector} {len(selection)} of {len(pool)} pool rows "
                      f"({'cache-aware' if recipe.calibration.cache_aware and has_cache(recipe) else 'no cache'})")
    else:
        dynamic = recipe.quant.backend == "torchao"
        why = ("quant.backend torchao quantizes activations at run time" if dynamic
               else f"quant.preset {recipe.quant.preset} quantizes no activations")
        for i, name in ((1, "pool"), (2, "selection")):
            log(f"[{i}/{len(STAGES)}] {name}: skipped ({why})")
        calib_desc = "none (dynamic activations)" if dynamic else "none (weights only)"

    # 3: quantize
    k_q = stage_key(selection=k_sel if calibrate else None, model=R["model"], quant=R["quant"],
                    guidance=recipe.sampling.guidance_scale > 1.0, condition=cond)

    def build_quant_stage(tmp: Path) -> dict:
        model = quantize_model(recipe, fp, selection, parts)
        save_quantized(model, tmp / "transformer")
        box["quantized"] = model
        return {"preset": recipe.quant.preset, "modules": len(model.qcache_quant["modules"]),
                "bytes": checkpoint_bytes(tmp / "transformer")}

    res = run(3, "quantize", k_q, build_quant_stage,
              lambda i: f"{i['preset']}, {i['modules']} modules quantized, {i['bytes'] / 1e6:.2f} MB")
    qmodel = box["quantized"] if "quantized" in box else load_quantized(res.path / "transformer", device=device)
    q_bytes = res.info["bytes"]

    # 4: cache schedule on the quantized model
    from .cache import StaticSchedule

    k_s = stage_key(quantized=k_q, cache=R["cache"], sampling=R["sampling"])

    def build_schedule_stage(tmp: Path) -> dict:
        schedule, info = cache_schedule(recipe, qmodel, sched, tau_guess, parts)
        if schedule is not None:
            schedule.save(tmp / "cache_schedule.json")
        return {**info, "nfc": schedule.nfc if schedule else recipe.sampling.steps,
                "full_steps": list(schedule.full_steps) if schedule else None}

    res = run(4, "schedule", k_s, build_schedule_stage,
              lambda i: f"{i['policy']}, NFC {i['nfc']}" + (f", tau {i['tau']:.4g}" if i.get("tau") else ""))
    sched_info = res.info
    schedule = StaticSchedule.load(res.path / "cache_schedule.json") if sched_info["full_steps"] else None
    compressed = CompressedModel(qmodel, sched, recipe.sampling, recipe.cache, schedule, None,
                                 source=recipe.model.source, parts=parts)

    # 5: variance compensation
    k_vc = stage_key(schedule=k_s, vc=R["vc"])

    def build_vc_stage(tmp: Path) -> dict:
        factors, curves = fit_variance_compensation(recipe, compressed, fp, sched)
        if factors is not None:
            save_file({"factors": factors.contiguous()}, str(tmp / "vc_factors.safetensors"))
        (tmp / "curves.json").write_text(json.dumps(curves))
        info = {"enabled": factors is not None, "final_error_without": curves["without_vc"][-1]}
        if factors is not None:
            info.update(min=float(factors.min()), max=float(factors.max()), mean=float(factors.mean()),
                        final_error_with=curves["with_vc"][-1])
        return info

    res = run(5, "vc", k_vc, build_vc_stage,
              lambda i: (f"K in [{i['min']:.3f}, {i['max']:.3f}], final-step error vs FP "
                         f"{i['final_error_without']:.4f} -> {i['final_error_with']:.4f}") if i["enabled"]
              else "disabled")
    vc_info = res.info
    curves = json.loads((res.path / "curves.json").read_text())
    if vc_info["enabled"]:
        compressed.vc_factors = load_file(str(res.path / "vc_factors.safetensors"))["factors"]

    # 6: FP reference samples
    k_ref = stage_key(model=R["model"], sampling=R["sampling"], n=recipe.eval.n, condition=cond)

    def build_reference_stage(tmp: Path) -> dict:
        samples, quality = reference_samples(recipe, fp, sched, progress, parts)
        _save_samples(tmp / "samples.safetensors", samples)
        box["reference"] = samples
        return quality

    res = run(6, "reference", k_ref, build_reference_stage,
              lambda i: f"class accuracy {_num(i['class_accuracy'], '.3f')}, FID vs data {_num(i['fid_data'], '.2f')}")
    reference = box["reference"] if "reference" in box else _load_samples(res.path / "samples.safetensors")
    ref_quality = res.info

    # 7: evaluate both on the same noise
    k_ev = stage_key(vc=k_vc, reference=k_ref, eval=R["eval"])

    def build_eval_stage(tmp: Path) -> dict:
        metrics = evaluate_pair(recipe, fp, sched, compressed, reference, ref_quality, q_bytes, progress)
        samples = metrics.pop("_samples")
        _save_samples(tmp / "samples.safetensors", samples)
        box["compressed_samples"] = samples
        return metrics

    res = run(7, "evaluate", k_ev, build_eval_stage,
              lambda i: f"FID to FP {_num(i['compressed']['fid_to_fp'], '.3f')}, PSNR "
                        f"{i['compressed']['psnr']:.2f} dB, latency ratio "
                        f"{i['compressed']['latency_ratio']:.2f}x, size ratio {i['compressed']['size_ratio']:.2f}x")
    metrics = res.info
    c_samples = box["compressed_samples"] if "compressed_samples" in box else _load_samples(res.path / "samples.safetensors")

    # 8: quality against NFC
    k_sw = stage_key(quantized=k_q, schedule=k_s, reference=k_ref)

    def build_sweep_stage(tmp: Path) -> dict:
        return {"points": quality_sweep(recipe, compressed, reference, sched_info.get("tau"), progress=progress)}

    res = run(8, "sweep", k_sw, build_sweep_stage, lambda i: f"{len(i['points'])} settings")
    sweep = res.info["points"]

    report = {
        "qcache_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "setup": {
            "model_source": recipe.model.source, "family": parts.family.name,
            "condition": parts.conditioner.fingerprint().split(":")[0],
            "decoded_by_vae": parts.vae is not None,
            "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "quant": recipe.quant.preset,
            "cache": recipe.cache.policy, "calibration": calib_desc, "steps": recipe.sampling.steps,
            "scheduler": recipe.sampling.scheduler, "guidance_scale": recipe.sampling.guidance_scale,
            "seed": recipe.sampling.seed,
        },
        **{k: metrics[k] for k in ("n", "latency_samples", "latency_repeats", "full_precision", "compressed")},
        "schedule": sched_info,
        "vc": vc_info,
        "error_per_step": curves,
        "quality_vs_nfc": sweep,
        "stages": timings,
        "recipe": R,
    }
    log("[artifact] writing report, plots and the artifact ...")
    files = plots(report, reference.images, c_samples.images)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report_json = (json.dumps(report, indent=2, default=str) + "\n").encode()
    files.update({"report.json": report_json, "report.md": report_markdown(report).encode()})
    artifact = write_artifact(out / "artifact", compressed, recipe, files)
    write_json(out / "report.json", report)
    return CompressResult(compressed, report, artifact, out)


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
    print(summary_table(result.report))
    print(f"artifact: {result.artifact}  (report: {result.out / 'report.json'}, "
          f"{result.report['seconds']:.0f}s)")


if __name__ == "__main__":
    run_cli(main)
