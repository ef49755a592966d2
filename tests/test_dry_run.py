"""tools/dry_run.py: the published configs it builds from, a tiny end-to-end run through the CLI, and its errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, cli_error


@pytest.fixture(scope="module")
def dr():
    spec = importlib.util.spec_from_file_location("dry_run", REPO / "tools" / "dry_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# published sizes: PixArt-alpha XL/2 611M, SD3-medium 2.0B, FLUX.1-dev 11.9B; DiT-XL/2 is 675M in the paper and
# 750M in the diffusers layout (every block keeps its own timestep / label embedder, 28 copies)
@pytest.mark.parametrize("name,low,high", [("dit-xl-2-256", 745e6, 755e6), ("pixart-alpha-512", 600e6, 620e6),
                                           ("sd3-medium", 2.0e9, 2.1e9), ("flux-dev-1024", 11.8e9, 12.0e9)])
def test_full_configs_have_the_published_size(dr, name, low, high):
    import diffusers

    cfg = dr.transformer_config(name, None, tiny=False)
    with torch.device("meta"):  # shapes only: no memory
        model = getattr(diffusers, dr.CONFIGS[name]["transformer"])(**cfg)
    assert low < sum(p.numel() for p in model.parameters()) < high


def test_blocks_reduce_the_depth(dr):
    assert dr.transformer_config("dit-xl-2-256", 3, tiny=False)["num_layers"] == 3
    flux = dr.transformer_config("flux-dev-1024", 2, tiny=False)
    assert (flux["num_layers"], flux["num_single_layers"]) == (2, 4)  # the published 1:2 ratio
    assert dr.transformer_config("flux-dev-1024", 50, tiny=False)["num_single_layers"] == 38


def test_tiny_flux_dry_run_through_the_cli(tmp_path):
    out = tmp_path / "dry.json"
    p = subprocess.run([sys.executable, "tools/dry_run.py", "--config", "flux-dev-1024", "--blocks", "1", "--tiny",
                        "--steps", "3", "--work", str(tmp_path / "work"), "--json", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res == json.loads(p.stdout)
    assert res["config"] == "flux-dev-1024" and (res["num_layers"], res["num_single_layers"]) == (1, 2)
    assert res["tiny"] is True and "VAE" in res["stand_ins"]
    assert 100e6 < res["peak_rss_bytes"] < 8e9  # torch + diffusers + a tiny model
    assert res["cache_bytes_per_image"] > 0 and res["nfc"] == 1
    files = [f for f in (tmp_path / "work" / "out" / "artifact").rglob("*") if f.is_file()]
    assert res["artifact_bytes"] == sum(f.stat().st_size for f in files) > 0
    stages = res["stage_seconds"]
    assert {"quantize", "schedule", "vc", "reference", "evaluate", "sweep", "build", "compress", "total"} <= set(stages)
    assert "pool" not in stages  # the FLUX recipe is weight-only (W8): no calibration stages
    assert all(v >= 0 for v in stages.values()) and stages["total"] >= stages["build"]
    recipe = json.loads((tmp_path / "work" / "recipe.json").read_text())
    assert recipe["sampling"]["guidance_scale"] == 3.5 and recipe["quant"]["preset"] == "W8"  # the shipped recipe's


def test_bad_arguments_fail_in_one_line(tmp_path):
    run = [sys.executable, "tools/dry_run.py"]
    bad = subprocess.run(run + ["--config", "flux-schnell"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert cli_error(bad).startswith("error: --config: must be one of dit-xl-2-256, pixart-alpha-512")
    bad = subprocess.run(run + ["--config", "dit-xl-2-256", "--steps", "1"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert cli_error(bad) == "error: --steps: must be >= 2 (one full step, one cached), got 1"
    bad = subprocess.run(run + ["--config", "dit-xl-2-256", "--json", str(tmp_path / "no" / "x.json")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert cli_error(bad).startswith("error: --json: directory not found")
    assert not (tmp_path / "no").exists()
