"""The evaluator CLI writes the promised metrics; the library measures any sampler the same way."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import cli_error, run_module


def test_evaluate_cli_writes_metrics(tiny_model_dir: Path, tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"source": str(tiny_model_dir), "device": "cpu"},
        "sampling": {"steps": 4, "batch_size": 16},
        "eval": {"latency_repeats": 2, "latency_samples": 8},
    }))
    out = tmp_path / "m.json"
    p = run_module("qcache.evaluate", str(recipe), "--n", "20", "--json", str(out), "--no-progress")
    assert p.returncode == 0, p.stderr
    m = json.loads(out.read_text())
    assert m["n"] == 20 and m["steps"] == 4 and m["nfc"] == 4
    assert 0.0 <= m["class_accuracy"] <= 1.0
    assert m["fid_data"] > 0 and m["latency_s"] > 0
    # a 2-block width-16 DiT on 8x8 with patch 2: linears alone are 2*(4*16*16 + 2*16*64) MACs per token...
    # so FLOPs per image must be positive and scale with steps (checked exactly in the cache tests)
    assert m["flops_per_image"] > 0
    assert m["recipe"]["sampling"]["steps"] == 4


def test_evaluate_rejects_too_small_n(tmp_path: Path):
    p = run_module("qcache.evaluate", "recipes/digits.yaml", "--n", "1")
    assert cli_error(p) == "error: --n: must be >= 2 (FID needs two samples), got 1"
