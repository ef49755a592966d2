"""Train the embedded digits DiT (qcache/models/builtin/digits) on scikit-learn's handwritten digits.

    python tools/train_digits.py [--steps 3000] [--batch 128] [--seed 0]

A class-conditional diffusers ``DiTTransformer2DModel`` (8x8x1 images, patch 2, 6 blocks of width 128) learns
epsilon-prediction under a linear-beta DDPM schedule of 1000 steps. Classifier-free guidance: the trainer
replaces 10 % of the labels by the null class (``num_embeds_ada_norm``), and sets the per-block label embedders'
own dropout to 0 so that every block sees the same label. An EMA of the weights is what gets saved, in diffusers
format (``transformer/`` + ``scheduler/``), written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import run_cli
from diffusers import DDPMScheduler, DiTTransformer2DModel
from tqdm import tqdm

from qcache.digits import NUM_CLASSES, load_split
from qcache.models.builtin_models import BUILTIN_DIR

MODEL_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=NUM_CLASSES,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def debias_ema(ema: torch.nn.Module, init: torch.nn.Module, init_weight: float) -> None:
    """Remove the initial weights' share from an EMA started at the initial weights (bias correction).

    After s steps an EMA of decay d still holds d^s of the random initialisation (5 % for d=0.999, s=3000), which
    shows as speckle noise in the samples. Like Adam's bias correction: ema ← (ema − d^s·init) / (1 − d^s).
    """
    with torch.no_grad():
        for pe, pi in zip(ema.parameters(), init.parameters()):
            pe.sub_(init_weight * pi).div_(1 - init_weight)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--label-drop", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(BUILTIN_DIR / "digits"))
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    images, labels = load_split("train")
    model = DiTTransformer2DModel(**MODEL_CONFIG)
    for block in model.transformer_blocks:  # label dropout is ours, identical for every block
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    init = copy.deepcopy(model).eval().requires_grad_(False)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    alphas = scheduler.alphas_cumprod
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = min(200, args.steps // 10)
    lr_at = lambda s: (min(1.0, (s + 1) / max(1, warmup))
                       * 0.5 * (1 + torch.cos(torch.tensor(s / args.steps * torch.pi)).item()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    t0 = time.time()
    model.train()
    bar = tqdm(range(args.steps), desc="train digits DiT", mininterval=5)
    for step in bar:
        idx = torch.randint(0, len(labels), (args.batch,), generator=g)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(args.batch, generator=g) < args.label_drop] = NUM_CLASSES
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(model(xt, timestep=t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    elapsed = time.time() - t0
    debias_ema(ema, init, args.ema ** args.steps)

    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ema.save_pretrained(tmp / "transformer", safe_serialization=True)
    scheduler.save_pretrained(tmp / "scheduler")
    info = dict(ema_bias_corrected=True, steps=args.steps, batch=args.batch, lr=args.lr, ema=args.ema,
                label_drop=args.label_drop,
                seed=args.seed, train_seconds=round(elapsed, 1), threads=torch.get_num_threads(),
                final_loss=round(loss.item(), 5), torch=torch.__version__)
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"trained {args.steps} steps in {elapsed:.0f}s, saved {out}")


if __name__ == "__main__":
    run_cli(main)
