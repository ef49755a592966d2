"""Sample many images to PNG shards and to the ADM evaluator's ``.npz``, resumably, on one or many processes.

    python -m qcache.sample SOURCE --n N --out DIR|X.npz [--seed S] [--batch-size B] [--class C | --all-classes]
                            [--raw] [--live]
    accelerate launch --num_processes K -m qcache.sample SOURCE --n N --out X.npz

SOURCE is an artifact directory or a ``qcache.compress`` output directory (the compressed model, as
``qcache.load`` gives it), or a recipe YAML (its full-precision model). Image i is drawn from noise seeded by
(seed, i) alone, and the images are made in fixed chunks of ``--batch-size`` by global index (chunk c runs on
process ``c % K``), so the samples are the same whatever the number of processes; on CPU, with equal threads per
process, bit-identical. Latent models are decoded by the base model's VAE.

Each chunk is a *shard*: a directory ``shard-START-END`` holding ``{i:07d}.png`` per image, ``labels.json`` and,
with ``--raw``, ``raw.safetensors`` (the float32 images in [-1, 1]); it appears atomically (renamed into place),
so a killed run leaves only whole shards and a re-run skips them. ``--out X.npz`` keeps its shards in ``X.shards/``
and, once all are there, writes ``X.npz`` in the layout of the ADM evaluator (arXiv 2105.05233,
``evaluations/evaluator.py``): ``arr_0`` uint8 (N, H, W, 3), grayscale replicated to 3 channels; ``arr_1`` the
class labels (prompt indices for text models). With several processes, rank 0 writes everything.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .errors import QcacheError

DEFAULT_BATCH = 32
MANIFEST = "sample.json"
FORMAT = 1


def image_seed(seed: int, index: int) -> int:
    """The noise seed of image ``index`` of a run with ``seed``: a 32-bit hash of the pair, independent of batching."""
    return int.from_bytes(hashlib.sha256(f"qcache.sample:{seed}:{index}".encode()).digest()[:4], "big")


def image_noise(seed: int, start: int, end: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise of images ``start..end-1``: one CPU generator per image, seeded by ``image_seed``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, i)))
                        for i in range(start, end)])


def shard_name(start: int, end: int) -> str:
    return f"shard-{start:07d}-{end:07d}"


def shard_dir_for(out: str | Path) -> Path:
    """Where the shards of ``--out`` live: the directory itself, or ``X.shards/`` beside ``X.npz``."""
    out = Path(out)
    return out.with_suffix(".shards") if out.suffix.lower() == ".npz" else out


def to_rgb_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8; one channel is replicated (the ADM evaluator wants RGB)."""
    from .images import to_uint8

    arr = to_uint8(images)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] != 3:
        raise QcacheError(f"samples: images need 1 or 3 channels for PNG/npz, got {arr.shape[-1]}")
    return arr


def write_shard(root: Path, start: int, labels: list[int], rgb: np.ndarray, raw: torch.Tensor | None) -> None:
    """Write one shard into a temporary directory and rename it into place (atomic on POSIX)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    end = start + len(labels)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shard_name(start, end)}.", suffix=".tmp", dir=root))
    try:
        for k, img in enumerate(rgb):
            Image.fromarray(img).save(tmp / f"{start + k:07d}.png", format="PNG")
        (tmp / "labels.json").write_text(json.dumps(labels) + "\n")
        if raw is not None:
            from safetensors.torch import save_file

            save_file({"images": raw.contiguous(), "labels": torch.tensor(labels)}, str(tmp / "raw.safetensors"))
        os.rename(tmp, root / shard_name(start, end))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_shards(root: Path, n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All images (N, H, W, 3) uint8 and labels (N,) int64 of a finished run, in index order."""
    from PIL import Image

    images, labels = [], []
    for start in range(0, n, batch_size):
        end = min(start + batch_size, n)
        d = root / shard_name(start, end)
        labels += json.loads((d / "labels.json").read_text())
        images += [np.asarray(Image.open(d / f"{i:07d}.png").convert("RGB")) for i in range(start, end)]
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """``arr_0`` = images, ``arr_1`` = labels, written through a temporary sibling and renamed (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images, labels)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclasses.dataclass
class Source:
    """What to sample with: a sampler context, the model parts (decoder, conditioner) and the defaults."""

    kind: str  # "artifact" | "recipe"
    path: str  # resolved SOURCE path
    sampler: contextlib.AbstractContextManager
    parts: object
    seed: int
    text: bool


def open_source(path: str, batch_size: int, device: str | None, live: bool) -> Source:
    """A compressed model (artifact / compress output directory) or a recipe's full-precision model."""
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        from .models import load_model, load_parts
        from .recipe import load_recipe
        from .sampling import Sampler

        if live:
            raise QcacheError("--live: only for a compressed model (SOURCE is a recipe)")
        recipe = load_recipe(p)
        model_cfg = recipe.model if device is None else dataclasses.replace(recipe.model, device=device)
        loaded = load_model(model_cfg)
        parts = load_parts(loaded, recipe.condition)
        cfg = dataclasses.replace(recipe.sampling, batch_size=batch_size)
        sampler = Sampler(loaded.transformer, loaded.scheduler_config, cfg, conditioner=parts.conditioner)
        return Source("recipe", str(p.resolve()), contextlib.nullcontext(sampler), parts, recipe.sampling.seed,
                      parts.family.text_conditioned)
    if not p.is_dir():
        raise QcacheError(f"SOURCE: not a recipe (.yaml) or an artifact directory: {path}")
    from . import load

    model = load(path, device=device or "auto")
    return Source("artifact", str(p.resolve()), model.sampler("live" if live else "static", batch_size=batch_size),
                  model.parts,
                  model.sampling.seed, model.parts.family.text_conditioned)


def check_manifest(root: Path, meta: dict) -> None:
    """Refuse to mix shards of another run into ``root``; record this run's settings there otherwise."""
    from .cli import atomic_write_bytes

    f = root / MANIFEST
    if f.is_file():
        old = json.loads(f.read_text())
        diff = [k for k in meta if old.get(k) != meta[k]]
        if diff:
            k = diff[0]
            raise QcacheError(f"--out: {root} holds samples of another run ({k} {old.get(k)!r}, now {meta[k]!r}); "
                              f"use another path or delete it")
        return
    atomic_write_bytes(f, (json.dumps(meta, indent=2) + "\n").encode())


def finished(root: Path, chunks: list[tuple[int, int]]) -> set[int]:
    """Indices of the chunks whose shard directory exists (shards appear whole, by rename)."""
    return {c for c, (s, e) in enumerate(chunks) if (root / shard_name(s, e) / "labels.json").is_file()}


def clean_partial(root: Path) -> None:
    """Remove temporary shard directories a killed run left behind."""
    if root.is_dir():
        for tmp in root.glob(".shard-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)


def sample_to(source: Source, n: int, out: str | Path, seed: int, batch_size: int, labels: torch.Tensor | None = None,
              raw: bool = False, progress: bool = True) -> dict:
    """Sample ``n`` images into the shards of ``out`` (and ``out`` itself for ``.npz``); returns a summary.

    Every process calls it; chunk c runs on rank ``c % world_size`` and rank 0 writes the shards and the npz."""
    from tqdm.auto import tqdm

    d = distributed.current()
    root = shard_dir_for(out)
    chunks = distributed.split_batches(n, batch_size)
    with source.sampler as sampler:
        with d.guard():
            ids = sampler.conditioner.default_ids(n) if labels is None else labels
            sampler.conditioner.check_ids(ids)
            if d.is_main:
                clean_partial(root)
                root.mkdir(parents=True, exist_ok=True)
                check_manifest(root, {"format": FORMAT, "source": source.path, "n": n, "seed": seed,
                                      "batch_size": batch_size,
                                      "labels_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()})
                done = finished(root, chunks)
            else:
                done = set()
        done = set(d.all_gather(sorted(done))[0])
        pending = [c for c in range(len(chunks)) if c not in done]
        mine = [c for i, c in enumerate(pending) if i % d.world_size == d.rank]
        shape = tuple(sampler.sample_shape)
        bar = tqdm(total=sum(chunks[c][1] - chunks[c][0] for c in mine), unit="img", desc="sampling",
                   disable=not (progress and d.is_main))
        with bar:
            for r in range(d.rounds(len(pending))):
                piece = None
                with d.guard():
                    i = r * d.world_size + d.rank
                    if i < len(pending):
                        c = pending[i]
                        start, end = chunks[c]
                        noise = image_noise(seed, start, end, shape)
                        out_set = sampler.sample(end - start, seed=image_seed(seed, start), labels=ids[start:end],
                                                 noise=noise, progress=False)
                        pixels = source.parts.to_pixels(out_set.images)
                        piece = (start, ids[start:end].tolist(), to_rgb_uint8(pixels), pixels if raw else None)
                        bar.update(end - start)
                pieces = d.gather(piece)  # to rank 0, the writer
                with d.guard():
                    if d.is_main:
                        for p in pieces:
                            if p is not None:
                                write_shard(root, *p)
        summary = {"n": n, "shards": len(chunks), "resumed": len(done), "dir": str(root)}
        with d.guard():
            if d.is_main and Path(out).suffix.lower() == ".npz":
                images, labs = read_shards(root, n, batch_size)
                write_npz(Path(out), images, labs)
                summary["npz"] = str(out)
                summary["shape"] = list(images.shape)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m qcache.sample", description=__doc__.splitlines()[0])
    ap.add_argument("source", help="artifact / qcache.compress output directory, or a recipe .yaml (full precision)")
    ap.add_argument("--n", type=int, required=True, help="number of images")
    ap.add_argument("--out", required=True, help="directory of PNG shards, or X.npz (ADM evaluator layout)")
    ap.add_argument("--seed", type=int, default=None, help="noise seed (default: the source's sampling.seed)")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                    help=f"images per chunk = shard = model batch (default {DEFAULT_BATCH})")
    ap.add_argument("--class", dest="cls", type=int, default=None,
                    help="class models: every image of this class (default: classes in turn)")
    ap.add_argument("--all-classes", action="store_true",
                    help="class models: cycle over every class (FID-50K) instead of the recipe's condition.classes")
    ap.add_argument("--raw", action="store_true", help="also keep the float32 images in each shard")
    ap.add_argument("--live", action="store_true", help="compressed model: run RCS live instead of the schedule")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda (default: the source's)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args()
    if args.n < 1:
        raise QcacheError(f"--n: must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise QcacheError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.seed is not None and args.seed < 0:
        raise QcacheError(f"--seed: must be >= 0, got {args.seed}")
    out = Path(args.out)
    if out.exists() and out.suffix.lower() != ".npz" and not out.is_dir():
        raise QcacheError(f"--out: must be a directory or an .npz file, got the file {args.out}")
    torch.set_grad_enabled(False)
    d = distributed.current()
    with d.guard():
        source = open_source(args.source, args.batch_size, args.device, args.live)
        labels = None
        if args.cls is not None:
            if source.text:
                raise QcacheError("--class: the model is text-conditional (its images cycle over its prompts)")
            classes = source.parts.conditioner.num_ids
            if not 0 <= args.cls < classes:
                raise QcacheError(f"--class: must be in [0, {classes - 1}] for this model, got {args.cls}")
            labels = torch.full((args.n,), args.cls, dtype=torch.long)
        elif args.all_classes:
            if source.text:
                raise QcacheError("--all-classes: the model is text-conditional (its images cycle over its prompts)")
            labels = torch.arange(args.n) % source.parts.conditioner.num_ids
    seed = source.seed if args.seed is None else args.seed
    summary = sample_to(source, args.n, out, seed, args.batch_size, labels=labels, raw=args.raw,
                        progress=not args.no_progress)
    if d.is_main:
        what = f"-> {summary['npz']} {tuple(summary['shape'])}" if "npz" in summary else f"-> {summary['dir']}"
        print(f"sampled {args.n} images in {summary['shards']} shards ({summary['resumed']} already done, "
              f"{d.world_size} process{'es' if d.world_size > 1 else ''}) {what}")


if __name__ == "__main__":
    distributed.main(main)
