"""Measure VC readings (least squares vs variance ratio) on the digits model: held-out error and FID-to-FP."""
# ruff: noqa: E402, E501  (a one-off measurement script: sys.path first, kept as it ran)
import dataclasses
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
from qcache.pipeline import build_pool, cache_schedule, fit_variance_compensation, quantize_model, select_calibration

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100
rm = RecipeModel.load(str(REPO / "recipes" / "digits.yaml"), device="cpu")
t0 = time.time()
def log(*a): print(f"[{time.time()-t0:6.0f}s]", *a, flush=True)
fp_s = rm.sampler()
ref = rm.pixels(fp_s.sample(N, progress=False))
log("reference", N)
out = {"n": N, "cases": []}
for preset, nfc in (("W8A8", 14), ("W4A8", 10)):
    base = rm.recipe
    r = replace(base, quant=replace(base.quant, preset=preset), cache=replace(base.cache, target_nfc=nfc, tune_samples=32),
                calibration=replace(base.calibration, cache_aware=False, pool_images=40, selector="random"))
    pool, _ = build_pool(r, rm.transformer, rm.scheduler_config, parts=rm.parts)
    sel = select_calibration(r, pool)
    q = quantize_model(r, rm.transformer, sel, parts=rm.parts)
    schedule, _ = cache_schedule(r, q, rm.scheduler_config, parts=rm.parts)
    cm = CompressedModel(q, rm.scheduler_config, r.sampling, r.cache, schedule, parts=rm.parts)
    log(preset, "quantized, schedule nfc", cm.nfc)
    case = {"preset": preset, "nfc": cm.nfc}
    with cm.sampler() as s:
        case["none"] = rm.compare(ref, rm.pixels(s.sample(N, progress=False)))
    for fit in ("least_squares", "variance"):
        rv = replace(r, vc=replace(r.vc, enabled=True, fit=fit))
        factors, curves, info = fit_variance_compensation(rv, cm, rm.transformer, rm.scheduler_config, with_info=True)
        with dataclasses.replace(cm, vc_factors=factors).sampler() as s:
            m = rm.compare(ref, rm.pixels(s.sample(N, progress=False)))
        case[fit] = {**m, "info": info}
        log(preset, fit, {k: info[k] for k in ("heldout_error_without", "heldout_error_with", "min", "max", "final_error_without", "final_error_with")}, "fid", m["fid_to_fp"], "psnr", m["psnr"])
    log(preset, "no VC fid", case["none"]["fid_to_fp"], "psnr", case["none"]["psnr"])
    out["cases"].append(case)
    json.dump(out, open(REPO / "docs/results/vc_measure.json", "w"), indent=1, default=float)
log("done")
