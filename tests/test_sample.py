"""qcache.sample: per-index noise, ADM evaluator npz layout, atomic shards and resuming, one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from qcache.errors import QcacheError
from qcache.sample import image_noise, open_source, sample_to, shard_dir_for, shard_name
from tests.conftest import cli_error, run_module


def digits_recipe(tmp_path: Path, steps: int = 3) -> Path:
    p = tmp_path / "digits-fast.yaml"
    p.write_text(yaml.safe_dump({"model": {"source": "builtin:digits", "device": "cpu"},
                                 "sampling": {"steps": steps, "seed": 0}}))
    return p


def run(recipe: Path, n: int, out: Path, batch: int, seed: int = 0, raw: bool = True) -> dict:
    torch.set_grad_enabled(False)
    src = open_source(str(recipe), batch, None, live=False)
    return sample_to(src, n, out, seed, batch, raw=raw, progress=False)


def raw_images(root: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    shards = sorted(p for p in root.iterdir() if p.name.startswith("shard-"))
    return torch.cat([load_file(str(s / "raw.safetensors"))["images"] for s in shards])


def test_noise_depends_on_the_index_only():
    a = image_noise(7, 0, 10, (1, 8, 8))
    b = torch.cat([image_noise(7, 0, 3, (1, 8, 8)), image_noise(7, 3, 10, (1, 8, 8))])
    assert torch.equal(a, b)
    assert not torch.equal(image_noise(7, 0, 2, (1, 8, 8)), image_noise(8, 0, 2, (1, 8, 8)))
    assert not torch.equal(a[0], a[1])


def test_npz_has_the_adm_evaluator_layout(tmp_path: Path):
    out = tmp_path / "samples.npz"
    summary = run(digits_recipe(tmp_path), 10, out, batch=4)
    assert summary["shards"] == 3 and summary["resumed"] == 0
    z = np.load(out)
    assert sorted(z.files) == ["arr_0", "arr_1"]
    imgs, labels = z["arr_0"], z["arr_1"]
    assert imgs.shape == (10, 8, 8, 3) and imgs.dtype == np.uint8  # NHWC, RGB
    assert np.array_equal(imgs[..., 0], imgs[..., 1]) and np.array_equal(imgs[..., 0], imgs[..., 2])  # gray x3
    assert labels.tolist() == list(range(10))
    assert imgs.std() > 0
    # the PNGs of the shards hold the same pixels, and the raw floats round to them
    root = shard_dir_for(out)
    assert root == tmp_path / "samples.shards"
    raw = raw_images(root)
    assert raw.shape == (10, 1, 8, 8)
    expect = ((raw.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    assert np.array_equal(imgs[..., 0], expect)
    # a batch size of its own changes GEMM shapes, not the images (noise is per index): equal up to rounding
    run(digits_recipe(tmp_path), 10, tmp_path / "b3", batch=3)
    assert torch.allclose(raw_images(tmp_path / "b3"), raw, atol=1e-4)


def test_resume_keeps_finished_shards_and_redoes_the_rest(tmp_path: Path):
    recipe = digits_recipe(tmp_path)
    out = tmp_path / "s.npz"
    run(recipe, 9, out, batch=4)
    root = shard_dir_for(out)
    first = (root / shard_name(0, 4) / "0000000.png").read_bytes()
    kept = root / shard_name(4, 8)
    os.utime(kept / "0000004.png", (1, 1))  # a marker: recomputing the shard would replace the file
    before = raw_images(root)
    import shutil

    shutil.rmtree(root / shard_name(0, 4))  # as if the run was killed before this shard was renamed into place
    (root / f".{shard_name(0, 4)}.x.tmp").mkdir()  # the half-written temporary a kill leaves behind
    out.unlink()
    summary = run(recipe, 9, out, batch=4)
    assert summary["resumed"] == 2 and summary["shards"] == 3
    assert os.stat(kept / "0000004.png").st_mtime == 1  # not recomputed
    assert (root / shard_name(0, 4) / "0000000.png").read_bytes() == first
    assert not list(root.glob(".*.tmp"))
    assert torch.equal(raw_images(root), before)
    assert np.load(out)["arr_0"].shape == (9, 8, 8, 3)
    meta = json.loads((root / "sample.json").read_text())
    assert meta["n"] == 9 and meta["batch_size"] == 4 and meta["seed"] == 0


def test_another_run_in_the_same_directory_is_refused(tmp_path: Path):
    recipe = digits_recipe(tmp_path, steps=1)
    run(recipe, 4, tmp_path / "o", batch=4)
    with pytest.raises(QcacheError, match=r"^--out: .* holds samples of another run \(seed 0, now 1\)"):
        run(recipe, 4, tmp_path / "o", batch=4, seed=1)


def test_cli_writes_npz_and_rejects_bad_input(tmp_path: Path):
    recipe = digits_recipe(tmp_path, steps=1)
    out = tmp_path / "cli.npz"
    p = run_module("qcache.sample", str(recipe), "--n", "6", "--batch-size", "4", "--class", "3", "--out", str(out),
                   "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "sampled 6 images in 2 shards" in p.stdout
    assert np.load(out)["arr_1"].tolist() == [3] * 6
    assert cli_error(run_module("qcache.sample", str(recipe), "--n", "0", "--out", str(out))) == \
        "error: --n: must be >= 1, got 0"
    err = cli_error(run_module("qcache.sample", str(recipe), "--n", "2", "--class", "10", "--out",
                               str(tmp_path / "x")))
    assert err == "error: --class: must be in [0, 9] for this model, got 10"
    assert not (tmp_path / "x").exists()
    err = cli_error(run_module("qcache.sample", str(tmp_path / "nope"), "--n", "2", "--out", str(tmp_path / "y")))
    assert err.startswith("error: SOURCE: not a recipe (.yaml) or an artifact directory")
