"""Data parallelism: 2 CPU processes (gloo) give bit-identical samples, evaluations and compress artifacts; an error
on one rank stops both with one line. qcache's modules are started by ``accelerate launch --multi_gpu``
(accelerate's ``--cpu`` multi-process mode needs mpirun; ``--multi_gpu`` starts torchrun-style processes, which use
gloo when there is no GPU; torchrun itself would read ``--n`` as an abbreviation of its own options), the error
test's script by torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from qcache.distributed import Dist, split_batches
from tests.conftest import REPO

# equal threads per process: equal kernels; PYTHONPATH: the script of the error test imports this checkout's qcache
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_start_two() -> str | None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available in this torch build"
    return None


pytestmark = pytest.mark.skipif(can_start_two() is not None, reason=str(can_start_two()))


def launch(procs: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m ARGS`` in ``procs`` processes started by accelerate (one plain process for procs == 1)."""
    if procs == 1:
        cmd = [sys.executable, "-m", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def errors(p: subprocess.CompletedProcess) -> str:
    """A failed launch's stderr without the import-time warnings every rank prints (so rank 0's cause shows)."""
    noise = ("register_constant", "Failed to load", "Unable to import `torchao`", "warnings.warn", "Warning:")
    return "\n".join(line for line in p.stderr.splitlines() if not any(n in line for n in noise))[-3000:]


def shard_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "sample.json"}


def test_split_covers_every_index_once():
    for world in (1, 2, 3):
        got = sorted(i for r in range(world) for i in Dist(r, world).mine(10))
        assert got == list(range(10))
    assert Dist(1, 2).mine(5) == [1, 3] and Dist(0, 3).rounds(7) == 3
    assert split_batches(10, 4) == [(0, 4), (4, 8), (8, 10)]


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> dict[str, Path]:
    from tests.tiny_pipelines import dit_pipeline

    root = tmp_path_factory.mktemp("dp")
    pipe = dit_pipeline(root / "dit-vae")
    out = {}
    for name, model, steps in (("digits", "builtin:digits", 4), ("dit", str(pipe), 3)):
        p = root / f"{name}.yaml"
        p.write_text(yaml.safe_dump({"model": {"source": model, "device": "cpu"},
                                     "sampling": {"steps": steps, "batch_size": 16},
                                     "eval": {"latency_repeats": 1, "latency_samples": 2}}))
        out[name] = p
    return out


@pytest.mark.parametrize("name", ["digits", "dit"])
def test_two_processes_sample_bit_identically(recipes, tmp_path: Path, name: str):
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}.npz"
        p = launch(procs, "qcache.sample", str(recipes[name]), "--n", "64", "--batch-size", "8", "--raw",
                   "--out", str(out), "--no-progress")
        assert p.returncode == 0, errors(p)
        assert f" {procs} process{'es' if procs > 1 else ''}) ->" in p.stdout
        runs[procs] = (np.load(out), shard_files(out.with_suffix(".shards")))
    (z1, f1), (z2, f2) = runs[1], runs[2]
    assert z1["arr_0"].shape == ((64, 8, 8, 3) if name == "digits" else (64, 16, 16, 3))
    assert np.array_equal(z1["arr_0"], z2["arr_0"]) and np.array_equal(z1["arr_1"], z2["arr_1"])
    assert len(f1) == 8 * (8 + 2) and f1.keys() == f2.keys()
    assert all(f1[k] == f2[k] for k in f1)  # PNGs, labels and the float32 raw images, byte for byte


def test_two_processes_evaluate_like_one(recipes, tmp_path: Path):
    res = {}
    for procs in (1, 2):
        js, st = tmp_path / f"e{procs}.json", tmp_path / f"e{procs}.safetensors"
        p = launch(procs, "qcache.evaluate", str(recipes["digits"]), "--n", "40", "--json", str(js),
                   "--samples", str(st), "--no-progress")
        assert p.returncode == 0, errors(p)
        assert p.stdout.count("class_accuracy=") == 1  # rank 0 alone reports
        res[procs] = (json.loads(js.read_text()), st.read_bytes())
    (m1, s1), (m2, s2) = res[1], res[2]
    assert s1 == s2
    assert m1["class_accuracy"] == m2["class_accuracy"] and m1["fid_data"] == m2["fid_data"]


def test_an_error_on_one_rank_stops_all_with_one_line(tmp_path: Path):
    script = tmp_path / "fail_one.py"
    script.write_text(
        "import time\n"
        "from qcache import distributed\n"
        "def entry():\n"
        "    d = distributed.current()\n"
        "    with d.guard():\n"
        "        if d.rank == 1:\n"
        "            raise ValueError('boom on one rank')\n"
        "        time.sleep(1)\n"
        "    print('not reached')\n"
        "distributed.main(entry)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "--tee", "0", str(script)]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "not reached" not in p.stdout
    errors = [line for line in (p.stdout + p.stderr).splitlines() if "error: " in line and "boom" in line]
    assert len(errors) == 1 and errors[0].endswith("error: rank 1: ValueError: boom on one rank"), p.stderr
    assert "Traceback" not in p.stderr.split("error: rank 1")[0]


# ---- data-parallel compress ---------------------------------------------------------------------------------------
# digits with small batches so that every split has several batches: pool 48 images in 6 batches, a calibration set
# of 260 rows in 3 passes of 128 (rank 0 gets two, rank 1 one), evaluation and sweep 24 images in 3 batches
TINY_COMPRESS = {
    "model": {"source": "builtin:digits", "device": "cpu"},
    "sampling": {"steps": 10, "batch_size": 8, "seed": 0},
    "eval": {"n": 24, "latency_repeats": 1, "latency_samples": 2},
    "cache": {"policy": "rfc", "target_nfc": 6, "warmup": 2, "tune_samples": 8},
    "calibration": {"pool_images": 48, "size": 260, "selector": "random"},
    "quant": {"observer": "percentile"},
    "vc": {"enabled": True, "samples": 8},  # forced: the VC file is compared too
}
ARTIFACT_FILES = ("transformer/model.safetensors", "transformer/quant_map.json", "cache_schedule.json",
                  "vc_factors.safetensors")


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stage_infos(out: Path) -> dict:
    def strip(v):  # latencies are measured, not computed
        return {k: strip(x) for k, x in v.items() if "latency" not in k} if isinstance(v, dict) else v

    return {p.parent.name: strip(json.loads(p.read_text())["info"]) for p in (out / "stages").glob("*/stage.json")}


@pytest.mark.slow
def test_two_processes_compress_like_one(tmp_path: Path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_COMPRESS))
    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"c{procs}"
        p = launch(procs, "qcache.compress", str(recipe), "--out", str(out), "--no-progress")
        assert p.returncode == 0, errors(p)
        assert p.stdout.count("artifact: ") == 1  # rank 0 alone reports
        assert p.stderr.count("[1/8] pool ...") == 1  # and logs
        outs[procs] = out
    one, two = outs[1], outs[2]
    for f in ARTIFACT_FILES:
        assert _sha(one / "artifact" / f) == _sha(two / "artifact" / f), f
    for f in ("reference/samples.safetensors", "evaluate/samples.safetensors", "pool/pool/data-00000-of-00001.arrow"):
        assert _sha(one / "stages" / f) == _sha(two / "stages" / f), f
    i1, i2 = _stage_infos(one), _stage_infos(two)
    assert i1 == i2 and len(i1) == 8
    assert i1["pool"]["rows"] > 256 and i1["selection"]["rows"] == 260  # three calibration passes, split
    qmap = json.loads((two / "artifact/transformer/quant_map.json").read_text())
    assert qmap["calibration_rows"] == 260 and qmap["observer"] == "percentile"
    report = json.loads((two / "report.json").read_text())
    assert report["setup"]["processes"] == 2 and "processes" not in json.loads((one / "report.json").read_text())[
        "setup"]
    assert not list(two.glob(".artifact.*")) and not list((two / "stages").glob(".*.partial"))
    # a re-run reuses every stage on every rank and writes the same artifact
    again = launch(2, "qcache.compress", str(recipe), "--out", str(two), "--no-progress")
    assert again.returncode == 0, errors(again)
    assert again.stderr.count("reused from an earlier run") == 8
    for f in ARTIFACT_FILES:
        assert _sha(one / "artifact" / f) == _sha(two / "artifact" / f), f


def test_two_processes_compress_error_is_one_line(tmp_path: Path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_COMPRESS))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    p = launch(2, "qcache.compress", str(recipe), "--out", str(blocker), "--no-progress", timeout=300)
    assert p.returncode != 0  # the launcher's own code (accelerate: 1); each rank exited with 2
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert lines == [f"error: --out: {blocker} exists and is not a directory"], errors(p)
    assert "Traceback" not in p.stderr.split("error: --out")[0]  # (the launcher prints its own after)
    assert blocker.read_text() == "not a directory"


def test_observer_states_merge_to_the_whole_data():
    import torch

    from qcache.quant.observers import AbsmaxObserver, PercentileObserver

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(50, 7, generator=g) * s for s in (1.0, 3.0, 0.5)]
    for make in (AbsmaxObserver, lambda: PercentileObserver(99.0, bins=64)):
        whole, parts = make(), [make(), make()]
        for p in range(whole.passes):
            for b in batches:
                whole.update(b, p)
            for i, b in enumerate(batches):  # batches 0 and 2 on "rank 0", batch 1 on "rank 1"
                parts[i % 2].update(b, p)
            states = [o.state(p) for o in parts]
            for o in parts:
                o.merge(states, p)
        assert parts[0].value() == parts[1].value() == whole.value()
        if isinstance(whole, PercentileObserver):
            assert torch.equal(parts[0].hist, whole.hist) and whole.value() < whole.absmax


def test_bench_scale_refuses_bad_arguments_before_launching():
    p = subprocess.run([sys.executable, str(REPO / "tools" / "bench_scale.py"), "--processes", "1"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == "error: --processes: must be >= 2, got 1"
    assert p.stdout == ""
