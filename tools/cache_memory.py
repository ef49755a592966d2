"""Feature-cache state per image for real model configurations, at every cache granularity and store dtype.

    python tools/cache_memory.py [--json PATH] [--policy rfc] [--order 2]

Shapes come from the published configurations (hard-coded below: depth, width, tokens at the stated resolution;
no weights needed); the bytes from ``qcache.cache.accounting.cache_bytes_per_image``, the formula of what a
running cache measures (``tests/test_cache_granularity.py`` checks the two agree). The model runs in bfloat16;
``store_dtype`` is the dtype of the stored differences (``cache.store_dtype``). Units per granularity:

- module: every cacheable module's output (DiT/PixArt: attn1, attn2, ff; SD3 and FLUX double-stream blocks: the
  joint attention on both streams, ff, ff_context; FLUX single-stream blocks: one unit each);
- block: one residual per transformer block (both streams of a joint block);
- span: one residual for the blocks between the fresh head and tail (1 and 1 here).

RFC (RFE + RCS) keeps, per unit and row, the last output, ``order`` differences and the last input, and RCS keeps
the watched input and its differences. Classifier-free guidance doubles the rows of an image (not FLUX.1-dev,
which is guidance-distilled).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qcache.cache.accounting import cache_bytes_per_image  # noqa: E402
from qcache.cli import run_cli, write_json  # noqa: E402

# shape fields of the published configs (diffusers transformer config.json) at the resolution in the name
CONFIGS = {
    "dit-xl-2-256": dict(kind="basic", blocks=28, width=1152, tokens=(256 // 8 // 2) ** 2, text=0, cross=False,
                         cfg=True),  # facebook/DiT-XL-2-256: 28 layers, 16 x 72 heads, latent 32, patch 2
    "pixart-alpha-512": dict(kind="basic", blocks=28, width=1152, tokens=(512 // 8 // 2) ** 2, text=120, cross=True,
                             cfg=True),  # PixArt-alpha/PixArt-XL-2-512x512: latent 64, patch 2, 120 T5 tokens
    "sd3-medium-1024": dict(kind="joint", blocks=24, single=0, width=1536, tokens=(1024 // 8 // 2) ** 2, text=333,
                            cfg=True),  # stabilityai/stable-diffusion-3-medium: 24 x 64 heads; 77 CLIP + 256 T5 tokens
    "flux-dev-1024": dict(kind="joint", blocks=19, single=38, width=3072, tokens=(1024 // 8 // 2) ** 2, text=512,
                          cfg=False),  # black-forest-labs/FLUX.1-dev: 19 double + 38 single blocks, 24 x 128 heads
}
GRANULARITIES = ("module", "block", "span")
STORE_BYTES = {"float32": 4, "bfloat16": 2}
MODE = {"rfc": "rfe", "taylorseer": "forecast", "fora": "reuse"}


def units(c: dict, granularity: str, head: int = 1, tail: int = 1) -> tuple[list[tuple[int, int]], int]:
    """(in_numel, out_numel) per row of every cached unit, and the numel of RCS's watched input."""
    w, n, t = c["width"], c["tokens"], c["text"]
    if c["kind"] == "basic":
        per_block = [(n * w, n * w)] * (3 if c["cross"] else 2)  # attn1, (attn2), ff: hidden states in and out
        if granularity == "module":
            return per_block * c["blocks"], n * w
        if granularity == "block":
            return [(n * w, n * w)] * c["blocks"], n * w
        return [(n * w, n * w)], n * w
    joint = (n + t) * w  # both streams as one tensor
    last_pre_only = c["single"] == 0  # SD3: the last joint block returns no text stream
    if granularity == "module":
        out = []
        for i in range(c["blocks"]):
            pre_only = last_pre_only and i == c["blocks"] - 1
            out += [(joint, n * w if pre_only else joint), (n * w, n * w)] + ([] if pre_only else [(t * w, t * w)])
        out += [(joint, joint)] * c["single"]
        return out, joint
    total = c["blocks"] + c["single"]
    if granularity == "block":
        return [(joint, n * w if last_pre_only and i == total - 1 else joint) for i in range(total)], joint
    return [(joint, joint)], joint  # span: the fresh tail (>= 1 block) keeps SD3's text-dropping block out


def rows(policy: str = "rfc", order: int = 2) -> list[dict]:
    out = []
    for name, c in CONFIGS.items():
        for g in GRANULARITIES:
            us, watched = units(c, g)
            for store, sb in STORE_BYTES.items():
                b = cache_bytes_per_image(us, MODE[policy], order, 2, sb, watched if policy == "rfc" else None,
                                          2 if c["cfg"] else 1)
                out.append({"config": name, "granularity": g, "store_dtype": store, "bytes_per_image": b,
                            "units": len(us), "policy": policy, "order": order})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write {'rows': [...]} here")
    ap.add_argument("--policy", default="rfc", choices=sorted(MODE))
    ap.add_argument("--order", type=int, default=2)
    args = ap.parse_args(argv)
    table = rows(args.policy, args.order)
    print(f"{'config':18} {'granularity':11} {'store':9} {'units':>5} {'MB / image':>11}")
    for r in table:
        print(f"{r['config']:18} {r['granularity']:11} {r['store_dtype']:9} {r['units']:5d} "
              f"{r['bytes_per_image'] / 2**20:11.1f}")
    if args.json:
        write_json(args.json, {"rows": table})


if __name__ == "__main__":
    run_cli(main)
