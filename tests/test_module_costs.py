"""tools/step_costs.py --ops (tools/module_costs.py): the shapes it reads off the models, the bytes it accounts, its
rows and its errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qcache.cache import fused
from tests.conftest import REPO


@pytest.fixture
def mc(monkeypatch):
    import tools.step_costs as mod

    monkeypatch.setattr(fused, "BACKEND", "eager")  # dynamo traces, no code generation in the tests
    fused.compiled.cache_clear()
    yield mod
    fused.compiled.cache_clear()


def test_shapes_come_from_the_model_configs(mc):
    assert mc.model_shape("digits") == (16, 128, 12)  # 8x8 latent, patch 2; width 4 x 32; 6 blocks x (attn1, ff)
    assert mc.model_shape("mid") == (256, 384, 24)  # DiT-S/2 at 256x256


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_account_the_tensors_each_part_reads(mc, dtype):
    st = mc.States(rows=4, tokens=3, width=8, modules=2, dtype=dtype)
    act = 4 * 3 * 8 * st.h.element_size()
    assert st.act_bytes == act
    fns = mc.step_functions(st)
    reads = {k: b // (2 * act) for k, (_, b) in fns.items()}  # activation-sized tensors per module
    assert reads == {"fora": 1, "taylor": 3, "rfe": 4, "rfe_input": 1, "rfe_update": 5, "stream": 4}
    rows = mc.measure(fns, repeats=2)
    assert [r["name"] for r in rows] == list(fns)
    for r in rows:
        assert r["ms_per_step"] > 0
        assert r["gb_per_s"] == pytest.approx(r["bytes_read"] / r["ms_per_step"] / 1e6)


def test_rfe_input_is_the_distance_the_cached_step_measures(mc):
    st = mc.States(rows=3, tokens=5, width=8, modules=1, dtype=torch.float32)
    s = st.mods[0]
    got = mc._rfe_input(st.h, st.ones, st.zeros, 1e-6, s["scale"], s["shift"], s["last"])
    x = torch.nn.functional.layer_norm(st.h, (8,), eps=1e-6) * (1 + s["scale"]) + s["shift"]
    torch.testing.assert_close(got, torch.linalg.vector_norm((x - s["last"]).reshape(3, -1), dim=1))


@pytest.mark.parametrize("command", [["tools/module_costs.py"], ["tools/step_costs.py", "--ops"],
                                     ["-m", "tools.step_costs", "--ops"]])
def test_bad_batch_is_one_line_and_writes_nothing(tmp_path, command):
    """Every way to run it (the old entry point, the merged script, the package module) parses the same flags."""
    out = tmp_path / "m.json"
    p = subprocess.run([sys.executable, *command, "--batch", "0", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and not out.exists()
    assert p.stderr.strip().splitlines()[-1] == "error: --batch and --repeats must be >= 1"
