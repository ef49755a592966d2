"""Per-step forecast error of every cacheable module, for several caches on the same full steps.

    python tools/cache_error_curves.py --nfc 10 --n 64 --json runs/cache_errors.json --plot docs/cache_errors.png

Tunes RFC's tau to the target NFC on the calibration batch, records RFC's full steps, then replays exactly those
full steps with TaylorSeer forecasts and with RFE forecasts, and also runs TaylorSeer and RFE on the evenly spread
schedule. RFC's run also keeps RCS's own signal, the watched input's forecast error e at every step.
Diagnostics mode runs every module on cached steps as well and keeps the relative L2 error of its forecast
(averaged over the batch); the trajectories themselves are the cached ones, so errors compound as in real use.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import DIGITS_RECIPE, RecipeModel, run_cli, write_json

from qcache.cache import attach_cache, tune_tau  # noqa: E402
from qcache.recipe import CacheConfig  # noqa: E402
from qcache.sampling import Sampler  # noqa: E402


def curves(sampler: Sampler, cfg: CacheConfig, n: int, seed: int, full_steps=None, tau=None) -> dict:
    cache = attach_cache(sampler.transformer, cfg, tau=tau, full_steps=full_steps)
    cache.record_errors()
    try:
        with sampler.extra_hooks(cache):
            sampler.sample(n, seed=seed, progress=False)
        rcs_err = getattr(cache.policy, "errors", None)  # RCS: e of the watched input per step (None: full step)
        rcs_err = None if rcs_err is None else list(rcs_err)
    finally:
        cache.remove()
    return {"full_steps": cache.stats.generations[-1].full_steps, "errors": cache.errors, "rcs_input_error": rcs_err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(DIGITS_RECIPE))
    ap.add_argument("--source", default=None)
    ap.add_argument("--nfc", type=int, default=10)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", required=True)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    sampler = RecipeModel.load(args.recipe, source=args.source).sampler(batch_size=args.n)
    rfc = CacheConfig(policy="rfc", order=2, target_nfc=args.nfc, tune_samples=args.n)
    res = tune_tau(sampler, rfc, args.nfc)
    runs = {"RFC": curves(sampler, rfc, args.n, args.seed, tau=res.tau)}
    mask = runs["RFC"]["full_steps"]
    runs["TaylorSeer on RFC's steps"] = curves(sampler, CacheConfig(policy="taylorseer", order=2), args.n, args.seed,
                                               full_steps=mask)
    runs["RFE on RFC's steps"] = curves(sampler, CacheConfig(policy="rfc", rcs=False, order=2), args.n, args.seed,
                                        full_steps=mask)
    runs["TaylorSeer (even steps)"] = curves(sampler, CacheConfig(policy="taylorseer", order=2, target_nfc=args.nfc),
                                             args.n, args.seed)
    runs["RFE (even steps)"] = curves(sampler, CacheConfig(policy="rfc", rcs=False, order=2, target_nfc=args.nfc),
                                      args.n, args.seed)
    summary = {}
    for name, r in runs.items():
        errs = [e for mod in r["errors"].values() for e in mod.values()]
        steps = r["full_steps"]
        gaps = [b - a for a, b in zip(steps, steps[1:])] + [sampler.config.steps - steps[-1]]
        per_step = [sum(d.get(i, 0) for d in r["errors"].values()) / len(r["errors"])
                    for i in range(sampler.config.steps)]
        summary[name] = {"mean_rel_err": sum(errs) / len(errs), "nfc": len(steps), "longest_gap": max(gaps),
                         "max_step_error": max(per_step)}
        print(f"{name:28s} nfc {len(steps):2d}  mean relative error {summary[name]['mean_rel_err']:.4f}  "
              f"max over steps {max(per_step):.3f}  longest gap {max(gaps)}  full steps {steps}")
    write_json(args.json, {"tau": res.tau, "summary": summary, "runs": {k: {
        "full_steps": v["full_steps"], "rcs_input_error": v["rcs_input_error"],
        "errors": {m: {str(s): e for s, e in d.items()} for m, d in v["errors"].items()}} for k, v in runs.items()}})
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        mods = list(next(iter(runs.values()))["errors"])
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
        for name, r in runs.items():
            steps = sorted({s for d in r["errors"].values() for s in d})
            mean = [sum(r["errors"][m].get(s, 0) for m in mods) / len(mods) for s in steps]
            axes[0].plot(steps, mean, marker=".", label=name)
            if r["rcs_input_error"] is not None:
                e = [(i, v) for i, v in enumerate(r["rcs_input_error"]) if v is not None]
                axes[0].plot(*zip(*e), ls="--", color="k", label="RCS signal: watched input error e")
            per_mod = [sum(d.values()) / max(len(d), 1) for d in (r["errors"].get(m, {}) for m in mods)]
            axes[1].plot(range(len(mods)), per_mod, marker="o", label=name)
        axes[0].set(xlabel="denoising step", ylabel="forecast rel. L2 error (mean over modules)", yscale="log")
        axes[1].set(xlabel="cacheable module (block.attn1, block.ff, ...)", ylabel="mean rel. L2 error", yscale="log")
        axes[1].set_xticks(range(len(mods)), [m.replace("transformer_blocks.", "") for m in mods], rotation=60)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot)


if __name__ == "__main__":
    run_cli(main)
