"""tools/ as a package: both ways to run a script, the shared module's helpers, and qcache.evaluate's timers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import tools  # noqa: F401 - makes ``common`` importable
from qcache.errors import QcacheError
from tests.conftest import REPO


def test_scripts_use_this_checkout_both_ways(tmp_path):
    """``python tools/x.py`` (from any directory) and ``python -m tools.x`` import this checkout's qcache."""
    probe = "import common, qcache; print(qcache.__file__)"
    script = tmp_path / "probe.py"  # run like a script that lives in tools/
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO / 'tools')!r}); {probe}")
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(REPO / "qcache" / "__init__.py")
    missing = tmp_path / "none.txt"
    for cmd, cwd in (([str(REPO / "tools" / "make_prompt_dataset.py")], tmp_path),
                     (["-m", "tools.make_prompt_dataset"], REPO)):
        p = subprocess.run([sys.executable, *cmd, str(missing), str(tmp_path / "out")], cwd=cwd, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == f"error: text: file not found: {missing}"
        assert not (tmp_path / "out").exists()


def test_table_cells_and_quality_key():
    import common

    rows = [{"method": "FP", "nfc": 50.0, "fid_to_fp": None, "psnr": 100.0},
            {"method": "RFC", "nfc": 14.0, "fid_to_fp": None, "psnr": 31.23456, "error": None}]
    table = common.markdown_table(rows, ["method", "nfc", "fid_to_fp", "psnr", "ssim"],
                                  formats={"nfc": lambda v: f"{v:.1f}"})
    assert table.splitlines() == ["| method | nfc | fid_to_fp | psnr | ssim |", "|---|---|---|---|---|",
                                  "| FP | 50.0 | - | 100 | - |", "| RFC | 14.0 | - | 31.23 | - |"]
    assert common.fmt(float("inf")) == "inf" and common.fmt(True) == "True" and common.fmt(3) == "3"
    assert common.quality_key(rows) == "psnr"
    rows[1]["fid_to_fp"] = 0.5
    assert common.quality_key(rows) == "fid_to_fp"
    assert common.better("fid_to_fp", 0.4, 0.5) and not common.better("psnr", 30.0, 31.0)


def test_run_row_records_row_errors_and_lets_bugs_through():
    import common

    def unreachable() -> dict:
        raise QcacheError("cache.target_nfc: no tau gives NFC 22")

    row = common.run_row({"method": "RFC"}, unreachable)
    assert row == {"method": "RFC", "error": "QcacheError: cache.target_nfc: no tau gives NFC 22"}
    oom = common.run_row({}, lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory.\nmore")))
    assert oom["error"] == "OutOfMemoryError: CUDA out of memory."
    assert common.run_row({"a": 1}, lambda: {"b": 2}) == {"a": 1, "b": 2}
    with pytest.raises(KeyError):  # a bug in the tool is not a configuration's failure
        common.run_row({}, lambda: {}["missing"])


def test_interleaved_times_runs_rounds_in_order():
    from qcache.evaluate import interleaved_times, wall_time

    calls: list[str] = []
    times = interleaved_times([lambda: calls.append("a"), lambda: calls.append("b")], 3,
                              warmup=[lambda: calls.append("w")])
    assert calls == ["w", "a", "b", "a", "b", "a", "b"]
    assert [len(t) for t in times] == [3, 3] and all(x >= 0 for t in times for x in t)
    dt, out = wall_time(lambda: 7)
    assert out == 7 and dt >= 0


def test_time_sampling_is_time_interleaved_of_one_sampler(monkeypatch):
    from qcache import evaluate

    class FakeSampler:  # counts the calls; the timer's contract is what is tested, not a model
        device = torch.device("cpu")

        def __init__(self):
            self.calls = []

        def sample(self, n, seed=0, progress=False):
            self.calls.append(n)

    s = FakeSampler()
    assert evaluate.time_sampling(s, 5, 3) >= 0
    assert s.calls == [2, 5, 5, 5]  # one warm-up run of min(n, 2) images, then the timed runs
    a, b = FakeSampler(), FakeSampler()
    assert len(evaluate.time_interleaved([a, b], 1, 2)) == 2 and a.calls == b.calls == [1, 1, 1]


def test_bench_cache_latency_run_that_fails_keeps_its_error():
    import tools.bench_cache as bc

    class FailingSampler:  # out of memory at the latency batch size, say
        calls = 0

        def sample(self, n, progress=False):
            FailingSampler.calls += 1
            raise torch.OutOfMemoryError("out of memory at batch 100")

    nfcs, errors = [], []
    run = bc.timed_run(FailingSampler(), 100, None, nfcs, errors)
    run(), run()
    assert errors == ["OutOfMemoryError: out of memory at batch 100"] and nfcs == [] and FailingSampler.calls == 1
    with pytest.raises(torch.OutOfMemoryError):  # without an error list the failure propagates
        bc.timed_run(FailingSampler(), 100, None, [])()
