"""Where a compressed model's speed-up comes from: its latency with each part switched on in turn.

    python tools/latency_parts.py ARTIFACT [--n 100] [--repeats 3] [--json PATH]

Times, in interleaved rounds of one run (``qcache.evaluate.time_interleaved``, the main job's own timing), sampling
``--n`` images with:

- ``fp``: the full-precision model of the artifact's recipe (``model.source``), every step computed;
- ``quant``: the quantized transformer, every step computed;
- ``cache``: the full-precision model with the artifact's cache schedule (same policy, same full steps);
- ``quant+cache``: the quantized transformer with that schedule;
- ``compressed``: quantization, schedule and VC, as ``qcache.load(ARTIFACT).generate`` samples.

Each configuration runs on its own copy of the transformer, so no cache hook is ever shared. ``latency_ratio`` is
fp's median over the row's. Read with the FLOPs ratio of the artifact's report: the product of the parts' ratios is
what the compressed model could reach if they did not interact; the rows say which part falls short.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

from common import log, run_cli, time_interleaved, write_json

import qcache  # noqa: E402
from qcache.errors import QcacheError  # noqa: E402
from qcache.models.loading import load_model  # noqa: E402
from qcache.recipe import load_recipe  # noqa: E402
from qcache.sampling import Sampler  # noqa: E402

PARTS = ("fp", "quant", "cache", "quant+cache", "compressed")


def samplers(artifact: str, device: str, stack: contextlib.ExitStack) -> dict[str, Sampler]:
    """One sampler per part, each on its own transformer (a fresh load of the artifact or of the FP model)."""
    from pathlib import Path

    recipe_file = Path(artifact) / "recipe.yaml"
    if not recipe_file.is_file():
        recipe_file = Path(artifact) / "artifact" / "recipe.yaml"  # a qcache.compress output directory
    if not recipe_file.is_file():
        raise QcacheError(f"artifact: no recipe.yaml in {artifact} (not a qcache artifact)")
    model_cfg = dataclasses.replace(load_recipe(recipe_file).model, device=device)
    out: dict[str, Sampler] = {}
    for part in PARTS:
        cm = qcache.load(artifact, device=device)
        if part in ("fp", "cache"):
            cm = dataclasses.replace(cm, transformer=load_model(model_cfg).transformer)
        if part in ("fp", "quant"):
            out[part] = Sampler(cm.transformer, cm.scheduler_config, cm.sampling, conditioner=cm.parts.conditioner)
        else:
            out[part] = stack.enter_context(cm.sampler(vc=part == "compressed"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", help="a qcache artifact (or a qcache.compress output directory)")
    ap.add_argument("--n", type=int, default=100, help="images per timed run (the main job's eval.latency_samples)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        raise QcacheError("--n and --repeats must be >= 1")
    import torch

    with contextlib.ExitStack() as stack:
        ss = samplers(args.artifact, args.device, stack)
        log(f"latency: {len(ss)} configurations x {args.repeats} rounds of {args.n} images, "
            f"threads={torch.get_num_threads()}")
        times = time_interleaved(list(ss.values()), args.n, args.repeats)
    fp = times[0]
    rows = [{"part": k, "latency_s": t, "latency_ratio": fp / t} for k, t in zip(ss, times)]
    for r in rows:
        print(f"{r['part']:>12}: {r['latency_s']:.3f} s  {r['latency_ratio']:.2f}x")
    if args.json:
        write_json(args.json, {"artifact": str(args.artifact), "n": args.n, "repeats": args.repeats,
                               "threads": torch.get_num_threads(), "device": args.device, "rows": rows})


if __name__ == "__main__":
    run_cli(main)
