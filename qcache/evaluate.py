"""Evaluate a recipe's full-precision model: class accuracy, FID against held-out digits, latency, FLOPs.

Class accuracy and FID against data need a judge; qcache has one for digit images (its own classifier). For other
models both are reported as null; latency and FLOPs are measured for every model.

    python -m qcache.evaluate RECIPE [--n N] [--json PATH] [--samples PATH]

Library use: ``evaluate_sampler(sampler, n)`` measures any sampler (full precision, cached, quantized) the same
way, so that later stages report comparable numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import torch

from . import __version__
from .classifier import classify
from .cli import INT_LIMIT, check_output_path, write_json
from .digits import load_split
from .flops import count_flops
from .metrics import fid_from_features
from .models import load_model, load_parts
from .recipe import EvalConfig, Recipe, load_recipe, recipe_to_dict
from .sampling import Sampler, SampleSet


@lru_cache(maxsize=1)
def reference_features() -> torch.Tensor:
    """Classifier features of the held-out real digits (the FID reference)."""
    images, _ = load_split("test")
    return classify(images)[1]


def has_judge(samples: SampleSet, conditioner=None) -> bool:
    """Whether the digits classifier can judge these samples: 1x8x8 images of a class model with 10 classes."""
    from .families import ClassConditioner
    from .metrics import DIGITS_SHAPE

    if conditioner is not None and not (isinstance(conditioner, ClassConditioner) and conditioner.num_classes == 10):
        return False
    labels_ok = len(samples.labels) == 0 or (int(samples.labels.min()) >= 0 and int(samples.labels.max()) < 10)
    return tuple(samples.images.shape[1:]) == DIGITS_SHAPE and labels_ok


def quality_metrics(samples: SampleSet, conditioner=None) -> dict[str, float | None]:
    """Class accuracy of the samples and their FID against held-out real digits (None without a judge)."""
    if not has_judge(samples, conditioner):
        return {"class_accuracy": None, "fid_data": None}
    preds, feats = classify(samples.images)
    return {
        "class_accuracy": float((preds == samples.labels).float().mean()),
        "fid_data": fid_from_features(feats, reference_features()),
    }


def selected_metrics(samples: SampleSet, conditioner, eval_cfg: EvalConfig, reference: torch.Tensor | None = None,
                     device: torch.device | str = "cpu") -> dict[str, float | None]:
    """The metrics of ``eval.metrics`` other than the digits judge's, from local weights (None when skipped)."""
    from .errors import QcacheError
    from .metrics_local import local_metrics

    if not [m for m in eval_cfg.metrics if m not in ("class_accuracy", "fid_data")]:
        return {}
    names = getattr(conditioner, "prompts", None)
    prompts = [names[int(i)] for i in samples.labels] if names else None
    if reference is not None and tuple(reference.shape) != tuple(samples.images.shape):
        raise QcacheError(f"--reference: images of shape {tuple(reference.shape)}, the samples are "
                          f"{tuple(samples.images.shape)}")
    return local_metrics(samples.images, eval_cfg, prompts=prompts, reference=reference, device=device)


def wall_time(fn: Callable[[], Any], device: torch.device | None = None) -> tuple[float, Any]:
    """Seconds of one call of ``fn`` and its result; CUDA work queued on ``device`` is waited for on both sides."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def interleaved_times(fns: Sequence[Callable[[], object]], repeats: int, warmup: Sequence[Callable[[], object]] = (),
                      device: torch.device | None = None) -> list[list[float]]:
    """Wall times (s) of every function in ``repeats`` interleaved rounds (A, B, A, B, ...): one list per function.

    On a shared machine the load drifts; interleaving exposes every function to the same drift, so the ratio of
    two medians is far steadier than timing one function after the other. ``warmup`` runs once, untimed, first.
    """
    for fn in warmup:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            ts.append(wall_time(fn, device)[0])
    return times


def time_interleaved(samplers: list[Sampler], n: int, repeats: int, seed: int = 0) -> list[float]:
    """Median wall time (s) of sampling n images with each sampler, their runs interleaved (``interleaved_times``),
    after one untimed warm-up run of each (allocator, kernels, lazy inits)."""
    def run(s: Sampler, k: int) -> Callable[[], object]:
        return lambda: s.sample(k, seed=seed, progress=False)

    times = interleaved_times([run(s, n) for s in samplers], repeats, warmup=[run(s, min(n, 2)) for s in samplers],
                              device=samplers[0].device if samplers else None)
    return [statistics.median(ts) for ts in times]


def time_sampling(sampler: Sampler, n: int, repeats: int, seed: int = 0) -> float:
    """Median wall time (s) of sampling n images, over ``repeats`` runs after one untimed warm-up run."""
    return time_interleaved([sampler], n, repeats, seed)[0]


def flops_per_image(sampler: Sampler, seed: int = 0) -> int:
    """FLOPs of generating one image with every step of the loop (CFG doubles the model batch)."""
    return count_flops(lambda: sampler.sample(1, seed=seed, progress=False))


def evaluate_sampler(sampler: Sampler, n: int, eval_cfg: EvalConfig, progress: bool = True,
                     desc: str = "sampling", parts=None,
                     reference: torch.Tensor | None = None) -> tuple[dict, SampleSet]:
    """Sample n images and measure them; returns (metrics, samples as images: decoded when ``parts`` has a VAE).

    ``eval_cfg.metrics`` beyond the digits judge (fid, is, clip_score, lpips, psnr, ssim, fid_to_fp) are measured
    with local weights (``qcache.metrics_local``); ``reference`` is the paired image set the paired ones compare to.
    """
    from .distributed import sample_parallel

    samples = sample_parallel(sampler, n, progress=progress, desc=desc)  # split by batch over launched processes
    if samples is None:  # a rank > 0 of a data-parallel run: rank 0 measures
        return {}, None
    if parts is not None:
        samples = SampleSet(parts.to_pixels(samples.images), samples.labels)
    metrics = quality_metrics(samples, sampler.conditioner)
    metrics.update(selected_metrics(samples, sampler.conditioner, eval_cfg, reference, sampler.device))
    metrics["latency_s"] = time_sampling(sampler, min(eval_cfg.latency_samples, n), eval_cfg.latency_repeats)
    metrics["latency_samples"] = min(eval_cfg.latency_samples, n)
    metrics["flops_per_image"] = flops_per_image(sampler)
    return metrics, samples


def evaluate_recipe(recipe: Recipe, n: int | None = None, progress: bool = True,
                    reference: torch.Tensor | None = None) -> tuple[dict, SampleSet]:
    """Evaluate the full-precision model of ``recipe``; returns (report dict, samples). ``reference``: a paired
    image set for the paired metrics of ``eval.metrics``."""
    n = recipe.eval.n if n is None else n
    loaded = load_model(recipe.model)
    parts = load_parts(loaded, recipe.condition)
    sampler = Sampler(loaded.transformer, loaded.scheduler_config, recipe.sampling, conditioner=parts.conditioner)
    metrics, samples = evaluate_sampler(sampler, n, recipe.eval, progress=progress, parts=parts, reference=reference)
    if samples is None:  # a rank > 0 of a data-parallel run
        return None, None
    report = {
        "qcache_version": __version__,
        "model_source": recipe.model.source,
        "family": parts.family.name,
        "device": str(loaded.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "n": n,
        "steps": recipe.sampling.steps,
        "nfc": recipe.sampling.steps,
        "scheduler": recipe.sampling.scheduler,
        "guidance_scale": recipe.sampling.guidance_scale,
        "seed": recipe.sampling.seed,
        **metrics,
        "recipe": recipe_to_dict(recipe),
    }
    return report, samples


def main(argv: list[str] | None = None) -> None:
    """The command line (``argv`` default: ``sys.argv[1:]``); output paths are checked before any work."""
    ap = argparse.ArgumentParser(prog="python -m qcache.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("recipe", help="path to a YAML recipe")
    ap.add_argument("--n", type=int, default=None, help="number of samples (default: the recipe's eval.n)")
    ap.add_argument("--json", default=None, help="write the metrics to this JSON file")
    ap.add_argument("--samples", default=None, help="also save the samples to this .safetensors file")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ap.add_argument("--reference", default=None,
                    help="paired images (.safetensors with 'images', e.g. another run's --samples) for the paired "
                         "metrics of eval.metrics (lpips, psnr, ssim, fid_to_fp)")
    args = ap.parse_args(argv)
    if args.n is not None and not 2 <= args.n <= INT_LIMIT:
        from .errors import QcacheError

        bound = ">= 2 (FID needs two samples)" if args.n < 2 else f"<= {INT_LIMIT}"
        raise QcacheError(f"--n: must be {bound}, got {args.n}")
    from .distributed import current

    with current().guard():  # an error on any rank stops every rank; rank 0 alone measures and writes
        _evaluate_main(args)


def _evaluate_main(args) -> None:
    recipe = load_recipe(args.recipe)
    for flag, path in (("--json", args.json), ("--samples", args.samples)):
        if path:
            check_output_path(path, flag)
    reference = None
    if args.reference:
        from .metrics_local import read_paired

        reference = read_paired(args.reference)
    report, samples = evaluate_recipe(recipe, args.n, progress=not args.no_progress, reference=reference)
    if report is None:
        return
    keys = ("class_accuracy", "fid_data", "latency_s", "flops_per_image")
    print("  ".join(f"{k}={report[k]:.4g}" if report[k] is not None else f"{k}=null" for k in keys))
    if args.samples:
        from safetensors.torch import save

        from .cli import atomic_write_bytes

        atomic_write_bytes(args.samples, save({"images": samples.images.contiguous(), "labels": samples.labels}))
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    from .distributed import main as run_distributed

    run_distributed(main)  # run_cli, with one error line for all processes under accelerate launch / torchrun
