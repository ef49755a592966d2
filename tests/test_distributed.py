"""Data parallelism: 2 CPU processes (gloo) give bit-identical samples and evaluations; an error on one rank stops
both with one line. qcache's modules are started by ``accelerate launch --multi_gpu`` (accelerate's ``--cpu``
multi-process mode needs mpirun; ``--multi_gpu`` starts torchrun-style processes, which use gloo when there is no
GPU; torchrun itself would read ``--n`` as an abbreviation of its own options), the error test's script by torchrun."""

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
        assert p.returncode == 0, p.stderr[-3000:]
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
        assert p.returncode == 0, p.stderr[-3000:]
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
