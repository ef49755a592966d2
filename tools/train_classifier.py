"""Train the evaluator's digit classifier (qcache/models/builtin/digits_classifier.safetensors).

    python tools/train_classifier.py [--epochs 60] [--seed 0]

Trains on the digits' train split with small random shifts and noise, reports held-out accuracy, and saves the
weights atomically.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from common import run_cli
from safetensors.torch import save_file

from qcache.classifier import CLASSIFIER_PATH, DigitsCNN
from qcache.digits import load_split


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shift by up to one pixel and a little Gaussian noise, so generated digits are judged robustly."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(CLASSIFIER_PATH))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_split("train")
    x_test, y_test = load_split("test")
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    t0 = time.time()
    for _epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=g)
        for idx in perm.split(64):
            loss = F.cross_entropy(model(augment(x_train[idx], g)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"held-out accuracy {acc:.4f} after {args.epochs} epochs, {time.time() - t0:.1f}s")
    tmp = args.out + ".tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    run_cli(main)
