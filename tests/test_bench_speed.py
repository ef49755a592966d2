"""tools/bench_speed.py end to end at toy sizes: the CPU profile, the GPU profile's code path on CPU, bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytest.importorskip("torchao")

TOY = ["--layers", "1", "--steps", "6", "--nfcs", "4,3", "--batch", "2", "--repeats", "1"]


def bench(tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(REPO / "tools" / "bench_speed.py"), "--json", str(out), *extra],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    return p, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture
def bs():
    """tools/bench_speed.py as a module."""
    import tools.bench_speed as mod

    return mod


def test_cpu_profile_rows(tmp_path):
    # --compile / --cache-compile auto with a backend that cannot compile: the run falls back to eager and says so
    p, rep = bench(tmp_path, "--device", "cpu", "--latent", "8", "--cache-compile", "auto",
                   "--compile-backend", "no_such_backend", *TOY)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--compile auto falls back to off" in p.stdout and "--cache-compile auto falls back to off" in p.stdout
    rows = {r["config"]: r for r in rep["rows"]}
    # the baseline follows the CPU: bf16 where its GEMM beats fp32's (bf16 units), fp32 elsewhere
    bf16_fast = rep["microbench"]["gemm"]["bf16_over_fp32"] < 1
    base = "FP bf16" if bf16_fast else "FP fp32"
    cached = ["RFC NFC4", "RFC NFC3"] + (["fp32 + RFC NFC4", "fp32 + RFC NFC3"] if bf16_fast else [])
    first = ["FP bf16", "FP fp32"] if bf16_fast else ["FP fp32", "FP bf16"]
    assert list(rows) == first + ["int8"] + cached + ["int8 + RFC NFC4", "int8 + RFC NFC3"]
    assert rep["complete"] and rep["baseline"] == base and rows[base]["latency_ratio"] == 1.0
    for name, r in rows.items():
        assert set(r) >= {"config", "nfc", "latency_s", "latency_ratio", "device", "dtype", "date"}
        assert r["latency_s"] > 0 and abs(r["latency_ratio"] - rows[base]["latency_s"] / r["latency_s"]) < 1e-9
        if bf16_fast:
            assert r["latency_ratio_vs_fp32"] == pytest.approx(rows["FP fp32"]["latency_s"] / r["latency_s"])
        if "RFC" in name:
            assert r["nfc"] == len(r["full_steps"]) == int(name[-1]) and r["full_steps"][:2] == [0, 1]
        else:
            assert r["nfc"] == 6 and r["full_steps"] is None
        assert not r["compile"] and not r["cache_compile"]
    assert rows["FP bf16"]["dtype"] == "bfloat16" and rows["int8"]["quant"].startswith("int8")
    assert rows["RFC NFC4"]["dtype"] == rows[base]["dtype"] and rows["int8"]["dtype"] == "float32"
    # a CPU without bf16 units times its bf16 row on 3 steps and scales it
    assert rows["FP bf16"]["extrapolated"] == (not bf16_fast) and not rows["int8"]["extrapolated"]
    other = rows["FP fp32" if bf16_fast else "FP bf16"]["psnr_vs_baseline_db"]  # none for a scaled row
    assert (other is None) == (not bf16_fast) and rows["int8"]["psnr_vs_baseline_db"] > 10
    assert rep["model"]["num_layers"] == 1 and rep["model"]["attention_head_dim"] == 64  # mid-size shape
    assert set(rep["microbench"]["forward_s"]) == {"fp32", "bf16", "int8", "int8 (native torch._int_mm)",
                                                    "int8 (exact float route)"}
    assert rep["cpu_int_mm_route"] in ("native", "float")
    assert "acceptance" not in rep  # no NFC 14 row in this run
    assert rep["compile"] is False and rep["cache_compile"] is False


@pytest.mark.parametrize("baseline,slow_bf16,expected", [
    ("fp32", True, ["FP fp32", "FP bf16", "int8", "RFC NFC14", "int8 + RFC NFC14"]),
    ("fp32", False, ["FP fp32", "FP bf16", "int8", "RFC NFC14", "bf16 + RFC NFC14", "int8 + RFC NFC14"]),
    ("bf16", False, ["FP bf16", "FP fp32", "int8", "RFC NFC14", "fp32 + RFC NFC14", "int8 + RFC NFC14"]),
    ("bf16", True, ["FP bf16", "FP fp32", "int8", "RFC NFC14", "fp32 + RFC NFC14", "int8 + RFC NFC14"]),
])
def test_cpu_rows_follow_the_baseline(bs, baseline, slow_bf16, expected):
    vs = bs.variants(False, False, False, True, cpu_baseline=baseline)
    configs = bs.build_configs(vs, [14], 50, 3, 3, gpu_profile=False, slow_bf16=slow_bf16)
    assert [c.name for c in configs] == expected
    steps = {c.name: c.timed_steps for c in configs}
    # only a bf16 row that is not the baseline, on a CPU without bf16 units, is timed on few steps
    assert steps.pop("FP bf16") == (3 if slow_bf16 and baseline == "fp32" else 50)
    assert set(steps.values()) == {50}
    assert {c.variant.cfg.compute_dtype for c in configs if c.name.startswith("int8")} == {"float32"}


def test_gpu_profile_code_path_on_cpu(tmp_path):
    p, rep = bench(tmp_path, "--device", "cpu", "--full-size", "--latent", "4", "--compile", "on",
                   "--cache-compile", "on", "--compile-backend", "eager", *TOY)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r["config"]: r for r in rep["rows"]}
    assert list(rows) == ["FP bf16", "FP bf16 eager", "int8", "RFC NFC4", "RFC NFC3", "int8 + RFC NFC4",
                          "int8 + RFC NFC3"]
    assert rep["baseline"] == "FP bf16" and rows["FP bf16"]["compile"] and not rows["FP bf16 eager"]["compile"]
    assert all(r["dtype"] == "bfloat16" and not r["extrapolated"] for r in rows.values())
    assert rep["model"]["attention_head_dim"] == 72 and rep["model"]["num_attention_heads"] == 16
    # the cache's fused step functions, traced with the same eager backend
    assert rep["cache_compile"] and [n for n, r in rows.items() if r["cache_compile"]] == [n for n in rows if "RFC" in n]


def test_bad_nfc_is_a_one_line_error(tmp_path):
    p, rep = bench(tmp_path, "--device", "cpu", "--nfcs", "60")
    assert p.returncode == 2 and rep is None
    assert p.stderr.strip().splitlines()[-1].startswith("error: --nfcs: every NFC must be between 2 and --steps")


def test_cpu_acceptance_reports_rfc_alone_and_with_int8(bs):
    """The CPU acceptance block: RFC NFC 14 alone and with int8, each against 3.0, from the rows' medians."""
    import argparse

    from qcache.cache import StaticSchedule
    from qcache.recipe import QuantConfig

    fp = bs.Variant("fp32", "none", QuantConfig(preset="none"))
    q = bs.Variant("int8", "int8 W8A8 (dynamic)", QuantConfig(preset="W8A8", backend="torchao"))
    sched = StaticSchedule("ddim", 50, tuple(range(14)), "rfc", {})
    out = torch.linspace(-1, 1, 512).reshape(2, 4, 8, 8)
    configs = [bs.Config("FP fp32", fp, None, 3, 50, [60.0, 62.0, 64.0], out),
               bs.Config("RFC NFC14", fp, sched, 3, 50, [20.0, 21.0, 22.0], out + 0.01),
               bs.Config("int8 + RFC NFC14", q, sched, 3, 50, [15.0, 15.5, 40.0], out + 0.02)]
    args = argparse.Namespace(steps=50, batch=8, guidance=1.5, repeats=3, compile_backend="inductor")
    rep = bs.make_report(args, configs, torch.device("cpu"), {}, False, {}, complete=True)
    acc = rep["acceptance"]
    assert acc["rfc_nfc14_latency_ratio"] == pytest.approx(62.0 / 21.0) and not acc["ratio_ge_3"]
    assert acc["int8_rfc_nfc14_latency_ratio"] == pytest.approx(62.0 / 15.5) and acc["int8_ratio_ge_3"]
    assert rep["cpu_int_mm_route"] in ("native", "float")


def test_cpu_acceptance_with_a_bf16_baseline_also_reads_against_fp32(bs):
    import argparse

    from qcache.cache import StaticSchedule
    from qcache.recipe import QuantConfig

    bf, fp = bs.Variant("bf16", "none", QuantConfig(preset="none")), bs.Variant("fp32", "none", QuantConfig(preset="none"))
    q = bs.Variant("int8", "int8 W8A8 (dynamic)", QuantConfig(preset="W8A8", backend="torchao"))
    sched = StaticSchedule("ddim", 50, tuple(range(14)), "rfc", {})
    out = torch.linspace(-1, 1, 512).reshape(2, 4, 8, 8)
    configs = [bs.Config("FP bf16", bf, None, 1, 50, [36.0], out), bs.Config("FP fp32", fp, None, 1, 50, [60.0], out),
               bs.Config("RFC NFC14", bf, sched, 1, 50, [12.5], out), bs.Config("fp32 + RFC NFC14", fp, sched, 1, 50,
                                                                                 [20.0], out),
               bs.Config("int8 + RFC NFC14", q, sched, 1, 50, [10.0], out)]
    args = argparse.Namespace(steps=50, batch=8, guidance=1.5, repeats=1, compile_backend="inductor")
    rep = bs.make_report(args, configs, torch.device("cpu"), {}, False, {}, complete=True)
    acc = rep["acceptance"]
    assert rep["baseline"] == acc["baseline"] == "FP bf16"
    assert acc["rfc_nfc14_latency_ratio"] == pytest.approx(36 / 12.5) and not acc["ratio_ge_3"]
    assert acc["int8_rfc_nfc14_latency_ratio"] == pytest.approx(3.6) and acc["int8_ratio_ge_3"]
    assert acc["rfc_nfc14_latency_ratio_vs_fp32"] == pytest.approx(60 / 12.5)
    assert acc["fp32_rfc_nfc14_latency_ratio_vs_fp32"] == pytest.approx(3.0)
    assert acc["int8_rfc_nfc14_latency_ratio_vs_fp32"] == pytest.approx(6.0)
    rows = {r["config"]: r for r in rep["rows"]}
    assert rows["FP fp32"]["latency_ratio"] == pytest.approx(0.6) and rows["FP fp32"]["latency_ratio_vs_fp32"] == 1
