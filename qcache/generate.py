"""Generate images with a compressed artifact: quantization, cache schedule and VC active.

    python -m qcache.generate PATH --class 3 --n 16 --seed 0 --out grid.png [--live] [--samples x.safetensors]
    python -m qcache.generate PATH --prompt "a photo of a cat" [--prompt ...] --n 4 --out grid.png

PATH is an artifact directory or a ``qcache.compress`` output directory. ``--class`` is for class-conditional
models, ``--prompt`` (repeatable, cycled over the images; default: the artifact's prompt list) for text models;
latent-space models are decoded by the base model's VAE. ``--live`` runs relational cache scheduling live with
the tuned tau instead of replaying the static schedule.
"""

from __future__ import annotations

import argparse
import math

import torch

from .cli import INT_LIMIT, atomic_write_bytes, check_device, check_output_path, check_seed, run_cli, short
from .errors import QcacheError


def main(argv: list[str] | None = None) -> None:
    """The command line (``argv`` default: ``sys.argv[1:]``); every input is checked before the model loads."""
    ap = argparse.ArgumentParser(prog="python -m qcache.generate", description=__doc__.splitlines()[0])
    ap.add_argument("path", help="artifact directory (or a qcache.compress output directory)")
    ap.add_argument("--class", dest="cls", type=int, default=None,
                    help="class label of every image (default: 0, 1, 2, ... cycling)")
    ap.add_argument("--prompt", action="append", default=None,
                    help="text models: a prompt (repeat for several; cycled over the images)")
    ap.add_argument("--n", type=int, default=16, help="number of images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="PNG file for the image grid")
    ap.add_argument("--nrow", type=int, default=None, help="images per grid row (default: square-ish)")
    ap.add_argument("--scale", type=int, default=4, help="pixel upscaling of the grid")
    ap.add_argument("--live", action="store_true", help="run RCS live instead of replaying the static schedule")
    ap.add_argument("--samples", default=None, help="also save the raw images and labels as .safetensors")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if not 1 <= args.n <= INT_LIMIT:
        raise QcacheError(f"--n: must be in [1, {INT_LIMIT}], got {args.n}")
    check_seed(args.seed, "--seed")
    for flag, value in (("--nrow", args.nrow), ("--scale", args.scale)):
        if value is not None and not 1 <= value <= 256:
            raise QcacheError(f"{flag}: must be in [1, 256], got {value}")
    if not args.out.lower().endswith(".png"):
        raise QcacheError(f"--out: must be a .png file, got {short(args.out)}")
    check_device(args.device, "--device")
    check_output_path(args.out, "--out")
    if args.samples:
        check_output_path(args.samples, "--samples")

    from . import load
    from .images import make_grid, png_bytes

    model = load(args.path, device=args.device)
    text = model.parts.family.text_conditioned
    if args.cls is not None and text:
        raise QcacheError(f"--class: {type(model.transformer).__name__} is text-conditional; use --prompt")
    if args.prompt is not None and not text:
        raise QcacheError(f"--prompt: {type(model.transformer).__name__} is class-conditional; use --class")
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise QcacheError("--prompt: must be a non-empty string")
    labels = None
    if args.cls is not None:
        classes = model.parts.conditioner.num_ids
        if not 0 <= args.cls < classes:
            raise QcacheError(f"--class: must be in [0, {classes - 1}] for this model, got {args.cls}")
        labels = torch.full((args.n,), args.cls)
    torch.set_grad_enabled(False)
    samples = model.generate(args.n, labels=labels, seed=args.seed, mode="live" if args.live else "static",
                             progress=True, prompts=args.prompt)
    nrow = args.nrow or math.ceil(math.sqrt(args.n))
    atomic_write_bytes(args.out, png_bytes(make_grid(samples.images, nrow=nrow, scale=args.scale)))
    if args.samples:
        from safetensors.torch import save

        atomic_write_bytes(args.samples, save({"images": samples.images.contiguous(),
                                               "labels": samples.labels.contiguous()}))
    print(f"wrote {args.n} images (NFC {model.nfc} of {model.sampling.steps}) -> {args.out}")


if __name__ == "__main__":
    run_cli(main)
