"""quant.weight_clip none vs search at W4A8 on the digits model, without a cache (50 steps), on the ablation's naive
calibration set (random 256 rows of an uncached 103-image pool): FID-to-FP, PSNR, and the quantization time."""
# ruff: noqa: E402  (a measurement script: sys.path first)
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
from qcache.pipeline import build_pool, quantize_model, select_calibration
from qcache.recipe import CacheConfig

N = int(sys.argv[1]) if len(sys.argv) > 1 else 500
rm = RecipeModel.load(str(REPO / "recipes" / "digits.yaml"), device="cpu")
base = rm.recipe
r = replace(base, quant=replace(base.quant, preset="W4A8"),
            calibration=replace(base.calibration, cache_aware=False, pool_images=103, selector="random"))
pool, _ = build_pool(r, rm.transformer, rm.scheduler_config, parts=rm.parts)
sel = select_calibration(r, pool)
ref = rm.pixels(rm.sampler().sample(N, progress=False))
rows = []
for clip in ("none", "search"):
    t0 = time.perf_counter()
    m = quantize_model(replace(r, quant=replace(r.quant, weight_clip=clip)), rm.transformer, sel, parts=rm.parts)
    took = time.perf_counter() - t0
    cm = CompressedModel(m, rm.scheduler_config, r.sampling, CacheConfig(), parts=rm.parts)
    with cm.sampler() as s:
        out = rm.pixels(s.sample(N, progress=False))
    c = rm.compare(ref, out)
    clipped = m.qcache_quant.get("weight_clip", {}).get("modules", {})
    rows.append({"weight_clip": clip, "quantize_s": round(took, 2), "fid_to_fp": c["fid_to_fp"], "psnr": c["psnr"],
                 "ssim": c["ssim"], "class_accuracy": c["class_accuracy"],
                 "mean_alpha": (sum(v["mean_alpha"] for v in clipped.values()) / len(clipped)) if clipped else 1.0})
    print(rows[-1], flush=True)
out = Path(__file__).with_name("clip_measure.json")
out.write_text(json.dumps({"n": N, "calibration_rows": len(sel), "threads": torch.get_num_threads(), "rows": rows},
                          indent=1) + "\n")
