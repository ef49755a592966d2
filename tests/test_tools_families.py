"""tools/bench_cache.py, bench_quant.py and ablation.py on any recipe: a tiny random DiT with a VAE (latent, 1000
classes) and a tiny PixArt-α (T5 prompts, VAE), built in the real diffusers classes (tests/tiny_pipelines.py).

Off the digits judge FID-to-FP is null: the tools report PSNR/SSIM and their summaries compare PSNR. A configuration
that fails records its error in its row and the run goes on. Each tool runs in process (``main()`` with its command
line) to keep the tests quick.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

import tools  # noqa: F401 - makes the tools' shared module importable as ``common``
from qcache.errors import QcacheError
from qcache.families.text import save_prompts
from tests.tiny_pipelines import dit_pipeline, pixart_pipeline, prompts

CLASSES = [207, 360, 387, 974]


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> dict[str, Path]:
    """Tiny recipes of the DiT-with-VAE and PixArt pipelines: 6 steps, small pools, one latency image."""
    root = tmp_path_factory.mktemp("tool-pipelines")
    ds = save_prompts(prompts(4), root / "prompts")
    out = {}
    for fam, build in (("dit", dit_pipeline), ("pixart", pixart_pipeline)):
        cond = {"classes": CLASSES} if fam == "dit" else {"prompts": str(ds), "max_sequence_length": 16}
        data = {
            "model": {"source": str(build(root / fam)), "device": "cpu"},
            "sampling": {"scheduler": "ddim", "steps": 6, "guidance_scale": 4.0, "seed": 0, "batch_size": 8},
            "condition": cond,
            "eval": {"n": 4, "latency_repeats": 1, "latency_samples": 1},
            "output": {"dir": str(root / f"run-{fam}")},
            "cache": {"policy": "rfc", "target_nfc": 4, "warmup": 2, "tune_samples": 2},
            "calibration": {"pool_images": 2, "size": 8, "clusters": 2},
            "quant": {"preset": "W8A8"},
            "vc": {"samples": 2},
        }
        path = root / f"{fam}.yaml"
        path.write_text(yaml.safe_dump(data))
        out[fam] = path
    return out


def run_tool(monkeypatch, module, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", [f"tools/{module.__name__.rsplit('.', 1)[-1]}.py", *argv])
    module.main()


# ---- bench_cache ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", ["dit", pytest.param("pixart", marks=pytest.mark.slow)])
def test_bench_cache_on_a_latent_family_reports_psnr_and_records_a_failing_row(fam, recipes, tmp_path, monkeypatch,
                                                                             capsys):
    import tools.bench_cache as bc

    real = bc.resolve_cache

    def resolve(sampler, cfg, *a, **k):  # the RFC row at NFC 3 fails (out of memory, say): its error stays in its row
        if cfg.target_nfc == 3 and cfg.policy == "rfc" and cfg.rfe:
            raise QcacheError(f"cache.target_nfc: no tau gives NFC {cfg.target_nfc} +/- 0.5 on the calibration batch")
        return real(sampler, cfg, *a, **k)

    monkeypatch.setattr(bc, "resolve_cache", resolve)
    out = tmp_path / "bc.json"
    run_tool(monkeypatch, bc, "--recipe", str(recipes[fam]), "--n", "3", "--targets", "4,3", "--methods",
             "FORA,TaylorSeer,RFC", "--latency-samples", "1", "--repeats", "1", "--tune-samples", "2",
             "--cachedit-thresholds", "", "--json", str(out))
    rep = json.loads(out.read_text())
    assert rep["complete"] and rep["family"] == fam and rep["quality"] == "psnr"
    rows = {(r["method"], r["target_nfc"]): r for r in rep["rows"]}
    assert list(rows) == [("FP", 6), ("FORA", 4), ("TaylorSeer", 4), ("RFC", 4), ("FORA", 3), ("TaylorSeer", 3),
                          ("RFC", 3)]
    failed = rows["RFC", 3]
    assert failed["error"].startswith("QcacheError: cache.target_nfc: no tau gives NFC 3")
    assert "latency_ratio" not in failed and "psnr" not in failed
    for key, r in rows.items():
        if key == ("RFC", 3):
            continue
        assert r["fid_to_fp"] is None and r["class_accuracy"] is None and "error" not in r
        assert r["latency_s"] > 0 and r["latency_ratio"] > 0
        if key[0] == "FP":
            assert r["psnr"] == 100.0 and r["ssim"] == 1.0
        else:
            assert 5.0 < r["psnr"] < 100.0 and 0.0 < r["ssim"] < 1.0 and r["nfc"] <= 4.5
    acc = rep["acceptance"]
    assert list(acc) == ["4"]  # NFC 3 has no RFC row to judge
    assert acc["4"]["quality"] == "psnr" and acc["4"]["rfc_psnr"] == rows["RFC", 4]["psnr"]
    assert acc["4"]["rfc_ge_taylorseer"] == (rows["RFC", 4]["psnr"] >= rows["TaylorSeer", 4]["psnr"])
    printed = capsys.readouterr().out
    assert any(line.startswith("| RFC |") and "QcacheError" in line for line in printed.splitlines())
    assert "rfc_psnr=" in printed


def test_bench_cache_granularity_flag(recipes, tmp_path, monkeypatch):
    """--granularity sets cache.granularity where CacheConfig has the field, else fails in one line."""
    import dataclasses

    import tools.bench_cache as bc
    from qcache.recipe import CacheConfig

    has = "granularity" in {f.name for f in dataclasses.fields(CacheConfig)}
    if not has:
        with pytest.raises(QcacheError, match="--granularity: this qcache's CacheConfig has no granularity field"):
            bc.granularities("module,span")
        assert bc.granularities(None) == [None]
        return
    assert bc.granularities("module, span") == ["module", "span"]
    import argparse

    args = argparse.Namespace(warmup=2, tune_samples=2, tune_seed=1, cache_compile="off")
    assert bc.cache_config("FORA", 4, args, "span").granularity == "span"


# ---- bench_quant ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam,extras", [pytest.param("dit", True, marks=pytest.mark.slow), ("pixart", False)])
def test_bench_quant_on_a_latent_family_reports_psnr_and_records_a_failing_row(fam, extras, recipes, tmp_path,
                                                                             monkeypatch, capsys):
    import tools.bench_quant as bq

    real = bq.quantize_transformer

    def quantize(model, cfg, *a, **k):  # W4 runs out of memory, say: its rows and checkpoints keep the error
        if cfg.preset == "W4":
            raise RuntimeError("out of memory (injected)")
        return real(model, cfg, *a, **k)

    monkeypatch.setattr(bq, "quantize_transformer", quantize)
    out = tmp_path / "bq.json"
    argv = ["--recipe", str(recipes[fam]), "--n", "3", "--presets", "W8A8", "W4", "--sizes", "8", "--selectors",
            "random", "tap", "--pool-images", "2", "--tap-rows", "16", "--json", str(out)]
    run_tool(monkeypatch, bq, *argv, *([] if extras else ["--no-extras"]))
    rep = json.loads(out.read_text())
    assert rep["family"] == fam and rep["quality"] == "psnr" and rep["nfc"] == 4 and rep["schedule_error"] is None
    rows = rep["rows"]
    ref = rows[0]
    assert ref["variant"] == "reference" and ref["psnr"] == 100.0 and ref["fid_to_fp"] is None
    failed = [r for r in rows if r["weights"] == "int4"]
    assert failed and all(r["error"] == "RuntimeError: out of memory (injected)" for r in failed)
    good = [r for r in rows[1:] if r["weights"] != "int4"]
    # cache only, W8A8 x (random, tap) [, no cache, naive pool, W8, W8A8 and W8 conditioning fp32, W8 keep fp32]
    assert len(good) == (9 if extras else 3)
    for r in good:
        assert "error" not in r and r["fid_to_fp"] is None and 5.0 < r["psnr"] < 100.0, r
        assert r["nfc"] == (6 if r["cache"] == "none" else 4)
    printed = capsys.readouterr().out
    # mean over seeds: no FID-to-FP, the PSNR of the row
    tap = next(r for r in good if r["selector"] == "tap" and r["pool"] == "cache-aware" and r["variant"] == "default")
    assert f"| int8 | 8 | tap | 1 | - | {tap['psnr']:.4g} | - |" in printed
    if extras:
        ck = {(c["preset"], c["variant"]): c for c in rep["checkpoints"]}
        assert ck["W8A8", "default"]["ratio"] > 1.3 and "error" in ck["W4", "default"]
        assert set(rep["tap_timing"]) == {"uncached pool cut", "cache-aware pool"}


# ---- ablation ---------------------------------------------------------------------------------------------------
@pytest.mark.slow  # eight rows, each with its pool, quantization and schedule tuning: minutes on two shared cores
@pytest.mark.parametrize("fam", ["dit", "pixart"])
def test_ablation_on_a_latent_family_reports_psnr_and_records_failing_rows(fam, recipes, tmp_path, monkeypatch,
                                                                          capsys):
    import tools.ablation as ab

    def no_vc(*a, **k):
        raise RuntimeError("variance compensation failed (injected)")

    monkeypatch.setattr(ab, "fit_variance_compensation", no_vc)
    out = tmp_path / "ab.json"
    run_tool(monkeypatch, ab, "--recipe", str(recipes[fam]), "--n", "3", "--nfc", "4", "--latency-samples", "1",
             "--repeats", "1", "--json", str(out))
    rep = json.loads(out.read_text())
    assert rep["family"] == fam and rep["quality"] == "psnr"
    rows = {r["config"]: r for r in rep["rows"]}
    assert list(rows) == list(ab.ROWS)
    for name in ("+tap+vc", "qcache"):  # both fit VC: their errors stay in their rows
        assert rows[name]["error"] == "RuntimeError: variance compensation failed (injected)"
        assert "psnr" not in rows[name]
    assert rows["fp"]["psnr"] == 100.0 and rows["fp"]["nfc"] == 6 and rows["fp"]["fid_to_fp"] is None
    for name in ("ptq", "rfc", "naive", "+tap", "rfc_instead_of_fora"):
        r = rows[name]
        assert "error" not in r and r["fid_to_fp"] is None and 5.0 < r["psnr"] < 100.0, r
        assert r["latency_ratio"] > 0 and r["size_ratio"] >= 1.0
        assert r["nfc"] == (6 if name == "ptq" else 4)
    assert rows["ptq"]["size_ratio"] > 1.3 and rows["rfc"]["size_ratio"] == 1.0
    printed = capsys.readouterr().out
    assert any(line.startswith("| qcache |") and "RuntimeError" in line for line in printed.splitlines())
