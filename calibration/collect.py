"""Build the cache-aware calibration pool of a recipe and save it as a ``datasets.Dataset``.

    python -m calibration.collect RECIPE [--out PATH] [--images N] [--seed S] [--no-cache] [--no-progress]

Samples ``calibration.pool_images`` images with the recipe's full-precision model and, when
``calibration.cache_aware`` is on and the recipe has a ``cache`` section, with that cache active (tau tuned to
its target NFC as the cache engine does, unless a tuned tau is passed in), keeping the model inputs of the full
steps only. ``qcache.compress`` tunes tau itself (``qcache.pipeline.tune_fp_tau``) and passes it in.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from qcache.cli import INT_LIMIT, check_output_path, check_seed, run_cli
from qcache.models import load_model, load_parts
from qcache.recipe import Recipe, load_recipe
from qcache.sampling import Sampler

from .pool import collect_pool


def attach_recipe_cache(sampler: Sampler, recipe: Recipe, tau: float | None = None):
    """Attach the recipe's cache (if it has an active one) to ``sampler``; returns the cache or None.

    ``tau`` (already tuned, e.g. by ``qcache.pipeline.tune_fp_tau``) replaces ``cache.tau``; without it a recipe
    that asks for ``target_nfc`` has tau tuned here.
    """
    cfg = getattr(recipe, "cache", None)
    if cfg is None or getattr(cfg, "policy", "none") == "none":
        return None
    if tau is not None:
        cfg = dataclasses.replace(cfg, tau=tau)
    from qcache.cache import cache_sampler

    cache, _ = cache_sampler(sampler, cfg)
    return cache


def collect_for_recipe(recipe: Recipe, images: int | None = None, seed: int | None = None,
                       use_cache: bool | None = None, progress: bool = False, transformer=None,
                       scheduler_config: dict | None = None, conditioner=None, tau: float | None = None):
    """The pool of ``recipe`` (its FP model unless ``transformer`` is given); returns (dataset, cache or None).

    ``conditioner`` maps condition ids to conditions (default: the recipe's, built from ``condition``); ``tau``
    is the RCS threshold to sample with (None: ``cache.tau``, or tuned here to ``cache.target_nfc``). Under
    several processes the sampling is split by batch and the dataset is on rank 0 (None on the others).
    """
    cal = recipe.calibration
    if transformer is None:
        loaded = load_model(recipe.model)
        transformer, scheduler_config = loaded.transformer, loaded.scheduler_config
        if conditioner is None:
            conditioner = load_parts(loaded, recipe.condition).conditioner
    sampler = Sampler(transformer, scheduler_config, recipe.sampling, conditioner=conditioner)
    use_cache = cal.cache_aware if use_cache is None else use_cache
    cache = attach_recipe_cache(sampler, recipe, tau) if use_cache else None
    try:
        n = cal.pool_images if images is None else images
        pool = collect_pool(sampler, n, cal.pool_seed if seed is None else seed, progress=progress)
        if cache is not None:  # several processes: every rank's generations, in batch order
            from qcache.distributed import merge_cache_stats, split_batches

            merge_cache_stats(cache.stats, len(split_batches(n, sampler.config.batch_size)))
    finally:
        if cache is not None:
            cache.remove()
    return pool, cache


def main(argv: list[str] | None = None) -> None:
    """The command line (``argv`` default: ``sys.argv[1:]``); the output path is checked before any work."""
    import datasets

    from .storage import save_dataset

    datasets.disable_progress_bars()

    ap = argparse.ArgumentParser(prog="python -m calibration.collect", description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--out", default=None, help="pool directory (default: calibration.pool_path)")
    ap.add_argument("--images", type=int, default=None, help="images to generate (default: calibration.pool_images)")
    ap.add_argument("--seed", type=int, default=None, help="noise seed (default: calibration.pool_seed)")
    ap.add_argument("--no-cache", action="store_true", help="naive pool: every step, no cache")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.images is not None and not 1 <= args.images <= INT_LIMIT:
        from qcache.errors import QcacheError

        raise QcacheError(f"--images: must be in [1, {INT_LIMIT}], got {args.images}")
    if args.seed is not None:
        check_seed(args.seed, "--seed")
    recipe = load_recipe(args.recipe)
    out_path = args.out or recipe.calibration.pool_path
    check_output_path(out_path, "--out" if args.out else "calibration.pool_path", directory=True)
    t0 = time.perf_counter()
    pool, cache = collect_for_recipe(recipe, args.images, args.seed, False if args.no_cache else None,
                                     progress=not args.no_progress)
    took = time.perf_counter() - t0
    out = save_dataset(pool, out_path)
    from .select import column

    images = len(set(column(pool, "sample_id").tolist()))
    steps = int(column(pool, "num_steps")[0])
    mode = f"cache {recipe.cache.policy}" if cache is not None else "no cache"
    print(f"pool: {len(pool)} rows from {images} images ({len(pool) / images:.1f} full steps of {steps}, {mode}) "
          f"in {took:.1f}s -> {out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main)
