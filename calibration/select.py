"""Pick the calibration set from a pool: ``random`` (uniform over timesteps), ``kmeans`` or ``tap``.

    python -m calibration.select RECIPE [--pool PATH] [--out PATH] [--selector S] [--size N] [--seed S]

Library use: ``select(pool, "tap", 256, seed=0)`` returns the selected rows as a ``datasets.Dataset`` with an
extra ``pool_index`` column.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from qcache.cli import INT_LIMIT, check_output_path, check_seed, run_cli
from qcache.errors import QcacheError
from qcache.recipe import CalibrationConfig, load_recipe

from .selectors import ensure_coverage, select_kmeans, select_random, select_tap, time_bins

METHODS = ("random", "kmeans", "tap")


def column(ds, name: str) -> np.ndarray:
    """One column of a dataset as a numpy array: int64, or float64 for a float column (flow-matching timesteps)."""
    a = np.asarray(ds.with_format("numpy", columns=[name])[:][name])
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a.astype(np.int64)


def pool_features(pool, feature_pool: int = 1) -> np.ndarray:
    """Flattened x_t of every pool row, average-pooled spatially by ``feature_pool`` first (N, D) float32."""
    x = torch.from_numpy(np.asarray(pool.with_format("numpy", columns=["x"])[:]["x"], dtype=np.float32))
    if feature_pool > 1 and x.ndim == 4 and min(x.shape[-2:]) >= feature_pool:
        x = F.avg_pool2d(x, feature_pool)
    return x.flatten(1).numpy()


def select(pool, method: str, size: int, seed: int = 0, *, alpha: float = 0.5, sigma: float = 0.1,
           landmarks: int = 0, landmark_sets: int = 3, embed_dim: int = 16, clusters: int = 100,
           feature_pool: int = 1):
    """The ``size`` rows of ``pool`` picked by ``method`` (all rows if the pool is smaller), deterministic in seed."""
    if method not in METHODS:
        raise QcacheError(f"calibration.selector: must be one of {', '.join(METHODS)}, got {method!r}")
    if size < 1:
        raise QcacheError(f"calibration.size: must be >= 1, got {size}")
    t = column(pool, "timestep")
    if size >= len(pool):
        idx = np.arange(len(pool))
    elif method == "random":
        idx = ensure_coverage(select_random(t, size, seed), t, seed)
    else:
        f = pool_features(pool, feature_pool)
        if method == "kmeans":
            idx = select_kmeans(f, size, clusters, seed)
        else:
            idx = select_tap(f, t, size, alpha=alpha, sigma=sigma, landmarks=landmarks,
                             landmark_sets=landmark_sets, embed_dim=embed_dim, clusters=clusters, seed=seed)
        idx = ensure_coverage(idx, t, seed)
    idx = np.sort(idx)
    out = pool.select(idx.tolist())
    if "pool_index" in out.column_names:
        out = out.remove_columns("pool_index")
    return out.add_column("pool_index", idx.tolist())


def select_from_config(pool, cfg: CalibrationConfig, **overrides):
    """``select`` with the recipe's calibration parameters (keyword overrides win)."""
    kw = dict(method=cfg.selector, size=cfg.size, seed=cfg.seed, alpha=cfg.alpha, sigma=cfg.sigma,
              landmarks=cfg.landmarks, landmark_sets=cfg.landmark_sets, embed_dim=cfg.embed_dim,
              clusters=cfg.clusters, feature_pool=cfg.feature_pool)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return select(pool, **kw)


def covered_bins(pool, selection) -> tuple[int, int]:
    """(time bins holding a selected row, non-empty time bins of the pool), bins over the pool's time range."""
    bins = time_bins(column(pool, "timestep"))
    sel = bins[column(selection, "pool_index")]
    return len(np.unique(sel)), len(np.unique(bins))


def main(argv: list[str] | None = None) -> None:
    """The command line (``argv`` default: ``sys.argv[1:]``); the output path is checked before any work."""
    import datasets

    from .storage import load_dataset, save_dataset

    datasets.disable_progress_bars()

    ap = argparse.ArgumentParser(prog="python -m calibration.select", description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--pool", default=None, help="pool directory (default: calibration.pool_path)")
    ap.add_argument("--out", default=None, help="selection directory (default: calibration.selection_path)")
    ap.add_argument("--selector", default=None, choices=METHODS)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    if args.size is not None and not 1 <= args.size <= INT_LIMIT:
        raise QcacheError(f"--size: must be in [1, {INT_LIMIT}], got {args.size}")
    if args.seed is not None:
        check_seed(args.seed, "--seed")
    cfg = load_recipe(args.recipe).calibration
    out_path = args.out or cfg.selection_path
    check_output_path(out_path, "--out" if args.out else "calibration.selection_path", directory=True)
    pool = load_dataset(args.pool or cfg.pool_path, "--pool" if args.pool else "calibration.pool_path")
    t0 = time.perf_counter()
    sel = select_from_config(pool, cfg, method=args.selector, size=args.size, seed=args.seed)
    took = time.perf_counter() - t0
    out = save_dataset(sel, out_path)
    cov, bins = covered_bins(pool, sel)
    print(f"selection: {args.selector or cfg.selector} picked {len(sel)} of {len(pool)} pool rows "
          f"({cov}/{bins} time bins) in {took:.2f}s -> {out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main)
