"""quant.time_groups K = 1, 2, 4 (or argv[3]) at W4A8 (+ RFC NFC 10) on the digits model, same calibration set: FID-to-FP."""
# ruff: noqa: E402, E501  (a one-off measurement script: sys.path first, kept as it ran)
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tools"), str(REPO)]
import torch

torch.set_grad_enabled(False)
from common import RecipeModel

from qcache.compressed import CompressedModel
from qcache.pipeline import build_pool, cache_schedule, quantize_model, select_calibration

N = int(sys.argv[1]) if len(sys.argv) > 1 else 64
OUT = REPO / "docs/results" / (sys.argv[2] if len(sys.argv) > 2 else "tg_measure.json")
KS = [int(k) for k in sys.argv[3].split(",")] if len(sys.argv) > 3 else [1, 2, 4]
rm = RecipeModel.load(str(REPO / "recipes" / "digits.yaml"), device="cpu")
t0 = time.time()
def log(*a): print(f"[{time.time()-t0:6.0f}s]", *a, flush=True)
ref = rm.pixels(rm.sampler().sample(N, progress=False))
log("reference", N)
base = rm.recipe
r = replace(base, quant=replace(base.quant, preset="W4A8"), cache=replace(base.cache, target_nfc=10, tune_samples=32),
            calibration=replace(base.calibration, cache_aware=True, pool_images=64, selector="random"))
pool, info = build_pool(r, rm.transformer, rm.scheduler_config, parts=rm.parts)
sel = select_calibration(r, pool)
log("pool", len(pool), "selection", len(sel), "timesteps", len(set(sel["timestep"])))
schedule = None
out = {"n": N, "preset": "W4A8", "rows": []}
for k in KS:
    rk = replace(r, quant=replace(r.quant, time_groups=k))
    q = quantize_model(rk, rm.transformer, sel, parts=rm.parts)
    if schedule is None:  # one schedule for all K (tuned on K = 1): only the scales differ
        schedule, _ = cache_schedule(rk, q, rm.scheduler_config, parts=rm.parts)
    cm = CompressedModel(q, rm.scheduler_config, r.sampling, r.cache, schedule, parts=rm.parts)
    with cm.sampler() as s:
        m = rm.compare(ref, rm.pixels(s.sample(N, progress=False)))
    row = {"time_groups": k, "nfc": cm.nfc, **m, "edges": q.qcache_quant.get("time_groups", {}).get("edges")}
    out["rows"].append(row)
    log(row)
    json.dump(out, open(OUT, "w"), indent=1, default=float)
log("done")
