"""Why a selector calibrates better or worse: the activation ranges each selection gives against the whole pool's.

    python tools/calib_ranges.py --json docs/results/calib_ranges.json [--recipe recipes/digits.yaml]

Collects the recipe's cache-aware pool (as the compress pipeline does), observes every W8A8 module's input range
(the recipe's observer) on the whole pool, then on the selections of random, kmeans and TAP (size and seeds as
given), and reports per selector:
  - ``log_range_error``: mean over modules of |log(range_selection / range_pool)| (0 = the pool's ranges exactly),
  - ``range_ratio_mean``: mean of range_selection / range_pool (> 1: the selection's ranges are wider),
  - ``time_hist``: the share of selected rows in 10 equal bins of normalised time, against the pool's.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from common import DIGITS_RECIPE, RecipeModel, run_cli, write_json

from calibration.select import column  # noqa: E402
from calibration.selectors import time_bins  # noqa: E402
from qcache.pipeline import build_pool, select_calibration  # noqa: E402
from qcache.quant import observe_ranges, plan_quantization, run_calibration  # noqa: E402


def ranges(model, names, data, recipe, conditioner=None) -> np.ndarray:
    q = recipe.quant
    r = observe_ranges(model, names, lambda: run_calibration(model, data, recipe.sampling.guidance_scale > 1.0,
                                                             conditioner=conditioner),
                       q.observer, q.percentile)
    return np.array([r[n]["input"] for n in names])


def hist(t: np.ndarray) -> list[float]:
    return (np.bincount(time_bins(t), minlength=10) / len(t)).round(4).tolist()


def main() -> None:
    import datasets

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(DIGITS_RECIPE))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    datasets.disable_progress_bars()
    torch.set_grad_enabled(False)
    rm = RecipeModel.load(args.recipe, device="cpu")
    recipe, fp, sched, cond = rm.recipe, rm.transformer, rm.scheduler_config, rm.conditioner
    names = [n for n, s in plan_quantization(fp, recipe.quant).items() if s["activations"] != "none"]
    t0 = time.perf_counter()
    pool, _ = build_pool(recipe, fp, sched, parts=rm.parts)
    print(f"pool: {len(pool)} rows in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    full = ranges(fp, names, pool, recipe, cond)
    pool_t = column(pool, "timestep")
    out = {"pool_rows": len(pool), "modules": len(names), "size": args.size, "observer": recipe.quant.observer,
           "pool_time_hist": hist(pool_t), "selectors": {}}
    for method in ("random", "kmeans", "tap"):
        rows = []
        for seed in range(args.seeds):
            r = replace(recipe, calibration=replace(recipe.calibration, selector=method, size=args.size, seed=seed))
            sel = select_calibration(r, pool)
            ratio = ranges(fp, names, sel, recipe, cond) / full
            rows.append({"seed": seed, "log_range_error": float(np.abs(np.log(ratio)).mean()),
                         "range_ratio_mean": float(ratio.mean()), "range_ratio_min": float(ratio.min()),
                         "range_ratio_max": float(ratio.max()), "time_hist": hist(column(sel, "timestep"))})
        out["selectors"][method] = rows
        err = np.mean([x["log_range_error"] for x in rows])
        rat = np.mean([x["range_ratio_mean"] for x in rows])
        print(f"{method:7s} log_range_error={err:.4f} range_ratio_mean={rat:.4f} time_hist(seed 0)="
              f"{rows[0]['time_hist']}", file=sys.stderr)
    print(f"pool    time_hist={out['pool_time_hist']}", file=sys.stderr)
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    run_cli(main)
