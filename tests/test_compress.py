"""The compress pipeline end to end on a tiny DiT: report, artifact, load -> generate, tampering, resume."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import qcache
from qcache.artifact import MANIFEST, ArtifactError
from qcache.compress import compress
from qcache.recipe import recipe_from_dict
from tests.conftest import REPO, SCHEDULER_CONFIG, cli_error, run_module, tiny_dit

METRICS = ("nfc", "flops_ratio", "latency_ratio", "size_ratio", "fid_to_fp", "fid_data", "class_accuracy", "psnr")


def tiny_recipe(model_dir: Path, out: Path, **sections) -> dict:
    r = {
        "model": {"source": str(model_dir), "device": "cpu"},
        "sampling": {"steps": 8, "guidance_scale": 1.5, "seed": 0, "batch_size": 64},
        "eval": {"n": 12, "latency_repeats": 1, "latency_samples": 4},
        "output": {"dir": str(out)},
        "cache": {"policy": "rfc", "target_nfc": 4, "warmup": 2, "tune_samples": 6},
        "calibration": {"pool_images": 8, "size": 16, "clusters": 4},
        "quant": {"preset": "W8A8"},
        "vc": {"samples": 6, "enabled": True, "holdout_samples": 6},  # forced on: the VC file's path is tested
    }
    for k, v in sections.items():
        r[k] = {**r.get(k, {}), **v}
    return r


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from diffusers import DDPMScheduler

    d = tmp_path_factory.mktemp("tiny") / "tiny-dit"
    tiny_dit(out_channels=2).save_pretrained(d / "transformer", safe_serialization=True)  # learned sigma
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(d / "scheduler")
    return d


@pytest.fixture(scope="module")
def run(model_dir: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "out"
    recipe = recipe_from_dict(tiny_recipe(model_dir, out))
    return recipe, compress(recipe, out, progress=False, log=lambda m: None)


def test_latency_parts_times_each_part_of_the_artifact_on_its_own_model(run, tmp_path: Path, monkeypatch):
    """tools/latency_parts.py: one row per part, in order, ratios against fp; parts never share a transformer."""
    import tools  # noqa: F401 - makes ``common`` importable
    import tools.latency_parts as lp

    _, res = run
    seen: list[int] = []
    real = lp.time_interleaved

    def timed(samplers, n, repeats):
        seen.extend(id(s.transformer) for s in samplers)
        return real(samplers, n, repeats)

    monkeypatch.setattr(lp, "time_interleaved", timed)
    out = tmp_path / "parts.json"
    lp.main([str(res.out), "--n", "2", "--repeats", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert [r["part"] for r in data["rows"]] == list(lp.PARTS) and data["n"] == 2
    assert data["rows"][0]["latency_ratio"] == 1.0
    assert all(r["latency_s"] > 0 for r in data["rows"])
    assert len(set(seen)) == len(lp.PARTS)  # five transformers: no cache hook on a shared model
    with pytest.raises(qcache.QcacheError, match="no recipe.yaml"):
        lp.main([str(tmp_path), "--n", "2"])


def test_report_holds_every_metric_for_both_models(run):
    recipe, res = run
    report = json.loads((res.out / "report.json").read_text())
    assert report == json.loads((res.artifact / "report.json").read_text())
    for side in ("full_precision", "compressed"):
        for key in METRICS:
            assert isinstance(report[side][key], (int, float)), (side, key)
    fp, c = report["full_precision"], report["compressed"]
    assert fp["nfc"] == 8 and c["nfc"] == len(report["schedule"]["full_steps"]) and 3 <= c["nfc"] <= 5
    assert fp["fid_to_fp"] == pytest.approx(0.0, abs=1e-6) and fp["psnr"] == 100.0
    assert c["flops_ratio"] > 1.4  # half the steps skip the attention/FF modules
    assert c["size_ratio"] > 1.5  # int8 weights
    assert report["vc"]["enabled"] and len(report["error_per_step"]["with_vc"]) == 8
    assert [p["tau"] for p in report["quality_vs_nfc"]][0] == 0.0  # the sweep starts at tau = 0: every step full
    assert report["quality_vs_nfc"][0]["nfc"] == 8
    assert set(report["stages"]) == {"pool", "selection", "quantize", "schedule", "vc", "reference", "evaluate",
                                     "sweep"}
    md = (res.artifact / "report.md").read_text()
    assert "| FID to FP |" in md and "plots/samples.png" in md


def test_artifact_holds_every_part_with_checksums(run):
    _, res = run
    manifest = json.loads((res.artifact / MANIFEST).read_text())
    files = set(manifest["files"])
    assert {"recipe.yaml", "transformer/model.safetensors", "transformer/quant_map.json", "cache_schedule.json",
            "vc_factors.safetensors", "scheduler_config.json", "report.json", "report.md", "plots/samples.png",
            "plots/error_per_step.png", "plots/schedule.png", "plots/quality_vs_nfc.png"} <= files
    assert manifest["components"] == {"quant": "W8A8", "cache": "rfc", "nfc": res.compressed.nfc, "steps": 8,
                                      "sampler": "ddim", "vc": True}
    for f in files:
        if f.endswith(".png"):
            assert (res.artifact / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(res.out.glob(".artifact*"))  # no staging leftovers


def test_save_load_generate_is_bit_identical(run):
    _, res = run
    loaded = qcache.load(res.out)  # the output directory resolves to its artifact/
    assert loaded.nfc == res.compressed.nfc and torch.equal(loaded.vc_factors, res.compressed.vc_factors)
    for mode in ("static", "live"):
        a = res.compressed.generate(6, seed=3, mode=mode)
        b = loaded.generate(6, seed=3, mode=mode)
        assert torch.equal(a.images, b.images), mode
    assert not torch.equal(loaded.generate(6, seed=4).images, loaded.generate(6, seed=3).images)
    # the hooks come off again: the bare quantized transformer runs its original forward
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in loaded.transformer.modules()
                   if hasattr(m, "_diffusers_hook"))


def test_vc_changes_the_output_and_the_cache_is_live(run):
    import dataclasses

    _, res = run
    c = res.compressed
    k = c.vc_factors
    assert k is not None and k.ndim == 2 and not torch.all(k == 1)  # the fit moved some factor
    with c.sampler(vc=False) as s:
        plain = s.sample(6, seed=3, progress=False).images
    with c.sampler() as s:
        assert len(s.hooks) == 2  # the cache and VC
        with_vc = s.sample(6, seed=3, progress=False).images
    assert not torch.equal(plain, with_vc)
    with dataclasses.replace(c, vc_factors=torch.ones_like(k)).sampler() as s:  # identity factors: no change at all
        assert torch.equal(s.sample(6, seed=3, progress=False).images, plain)


@pytest.mark.parametrize("target,message", [
    ("transformer/model.safetensors", "checksum mismatch for .*transformer/model.safetensors"),
    ("vc_factors.safetensors", "checksum mismatch for .*vc_factors.safetensors"),
    ("cache_schedule.json", "checksum mismatch for .*cache_schedule.json"),
])
def test_tampered_file_is_refused(run, tmp_path: Path, target, message):
    _, res = run
    art = tmp_path / "art"
    shutil.copytree(res.artifact, art)
    p = art / target
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=message):
        qcache.load(art)
    if target.startswith("transformer"):  # the command line says it in one line, exit 2, and writes nothing
        png = tmp_path / "g.png"
        cli = run_module("qcache.generate", str(art), "--n", "2", "--out", str(png))
        assert cli_error(cli).startswith("error: artifact: checksum mismatch") and not png.exists()


def test_missing_file_and_unknown_version_are_refused(run, tmp_path: Path):
    _, res = run
    art = tmp_path / "art"
    shutil.copytree(res.artifact, art)
    (art / "vc_factors.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing: .*vc_factors.safetensors"):
        qcache.load(art)
    shutil.rmtree(art)
    shutil.copytree(res.artifact, art)
    m = json.loads((art / MANIFEST).read_text())
    (art / MANIFEST).write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(ArtifactError, match="unknown format_version 99"):
        qcache.load(art)


def test_generate_cli_writes_the_grid(run, tmp_path: Path):
    from PIL import Image

    _, res = run
    png, raw = tmp_path / "grid.png", tmp_path / "x.safetensors"
    cli = run_module("qcache.generate", str(res.artifact), "--class", "3", "--n", "4", "--seed", "0",
                     "--out", str(png), "--samples", str(raw), "--scale", "2")
    assert cli.returncode == 0, cli.stderr
    assert Image.open(png).size == (2 * 16 + 3, 2 * 16 + 3)  # 2x2 grid of 8x8 images at 2x, 1px padding
    from safetensors.torch import load_file

    saved = load_file(str(raw))
    assert saved["labels"].tolist() == [3, 3, 3, 3]
    expected = res.compressed.generate(4, labels=torch.full((4,), 3), seed=0)
    assert torch.equal(saved["images"], expected.images)
    bad = run_module("qcache.generate", str(res.artifact), "--class", "10", "--out", str(tmp_path / "b.png"))
    assert cli_error(bad) == "error: --class: must be in [0, 9] for this model, got 10"


def test_rerun_reuses_stages_and_a_changed_section_recomputes_downstream(run, model_dir: Path):
    recipe, res = run
    again = compress(recipe, res.out, progress=False, log=lambda m: None)
    assert all(st["reused"] for st in again.report["stages"].values())
    assert torch.equal(again.compressed.generate(4, seed=1).images, res.compressed.generate(4, seed=1).images)
    changed = dataclasses.replace(recipe, vc=dataclasses.replace(recipe.vc, samples=5))
    third = compress(changed, res.out, progress=False, log=lambda m: None)
    reused = {k: v["reused"] for k, v in third.report["stages"].items()}
    assert reused == {"pool": True, "selection": True, "quantize": True, "schedule": True, "vc": False,
                      "reference": True, "evaluate": False, "sweep": True}
    compress(recipe, res.out, progress=False, log=lambda m: None)  # leave the module's artifact as it was


def test_killed_run_leaves_no_artifact_and_resumes(model_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    rpath = tmp_path / "r.yaml"
    rpath.write_text(yaml.safe_dump(tiny_recipe(model_dir, out)))
    cmd = [sys.executable, "-m", "qcache.compress", str(rpath), "--no-progress"]
    p = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in p.stderr:
        if line.startswith("[4/8] schedule ..."):
            p.send_signal(signal.SIGKILL)
            break
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not (out / "artifact").exists() and not (out / "report.json").exists()
    assert {d.name for d in (out / "stages").iterdir() if not d.name.startswith(".")} <= {"pool", "selection",
                                                                                          "quantize", "schedule"}
    assert (out / "stages" / "quantize" / "stage.json").exists()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for stage in ("pool", "selection", "quantize"):
        assert f"{stage}: " in done.stderr and "reused from an earlier run" in done.stderr.split(f"{stage}: ")[1]
    assert "vc: " in done.stderr and "reused" not in done.stderr.split("vc: ")[1].splitlines()[0]
    assert qcache.load(out).nfc >= 2
    assert not list((out / "stages").glob(".*.partial")) and not list(out.glob(".artifact*"))


def test_bad_input_fails_in_one_line_and_writes_nothing(model_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    rpath = tmp_path / "r.yaml"
    rpath.write_text(yaml.safe_dump(tiny_recipe(model_dir, out, vc={"clamp_min": 2.0})))
    p = run_module("qcache.compress", str(rpath))
    assert cli_error(p) == "error: vc.clamp_min: must be <= 1.0, got 2.0"
    rpath.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "no-such-model", out)))
    p = run_module("qcache.compress", str(rpath))
    assert cli_error(p).startswith("error: model.source")
    assert not out.exists()


def test_tau_search_from_a_guess_finds_the_target_with_fewer_probes():
    from qcache.cache import tune_tau
    from qcache.recipe import CacheConfig, SamplingConfig
    from qcache.sampling import Sampler

    s = Sampler(tiny_dit(), SCHEDULER_CONFIG, SamplingConfig(steps=20, batch_size=8))
    cfg = CacheConfig(policy="rfc", target_nfc=8, tune_samples=4)
    cold = tune_tau(s, cfg, 8)
    for guess in (cold.tau, cold.tau * 3, cold.tau / 3):
        warm = tune_tau(s, cfg, 8, start=guess)
        assert abs(warm.nfc - 8) <= 0.5 and warm.schedule.nfc == round(warm.nfc)
        assert warm.probes[0][0] == guess
    assert len(tune_tau(s, cfg, 8, start=cold.tau).probes) == 1 < len(cold.probes)


def test_weights_only_without_cache_or_vc_skips_what_it_does_not_need(model_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    recipe = recipe_from_dict(tiny_recipe(model_dir, out, quant={"preset": "W8"}, cache={"policy": "none"},
                                          vc={"enabled": False}))
    lines: list[str] = []
    res = compress(recipe, out, progress=False, log=lines.append)
    assert any(line.startswith("[1/8] pool: skipped") for line in lines)
    assert not (out / "stages" / "pool").exists() and not (out / "stages" / "selection").exists()
    files = set(json.loads((res.artifact / MANIFEST).read_text())["files"])
    assert "cache_schedule.json" not in files and "vc_factors.safetensors" not in files
    assert res.report["compressed"]["nfc"] == 8 and res.report["quality_vs_nfc"] == []
    loaded = qcache.load(res.artifact)
    assert loaded.schedule is None and loaded.vc_factors is None
    assert torch.equal(loaded.generate(3, seed=0).images, res.compressed.generate(3, seed=0).images)
