"""quant.time_groups: one activation scale per group of timesteps, switched by the model's timestep, exact reload."""

from __future__ import annotations

import json

import pytest
import torch

from qcache.errors import QcacheError
from qcache.quant import load_quantized, quantize_transformer, save_quantized
from qcache.quant.time_groups import IN_BUF, group_of, group_rows
from qcache.recipe import QuantConfig, RecipeError, recipe_from_dict
from tests.conftest import tiny_dit
from tests.test_quant import calib_set


def _fwd(m, t: int):
    g = torch.Generator().manual_seed(5)
    x = 2 * torch.randn(4, 1, 8, 8, generator=g)
    with torch.no_grad():
        return m(x, timestep=torch.full((4,), t), class_labels=torch.tensor([1, 2, 3, 10]), return_dict=False)[0]


def test_group_rows_split_distinct_timesteps_high_to_low():
    assert group_rows([5, 900, 5, 400, 100, 700], 2) == [[1, 5], [0, 2, 3, 4]]  # 5 distinct: 2 + 3
    assert group_of(950.0, [600.0, 200.0]) == 0 and group_of(300.0, [600.0, 200.0]) == 1
    assert group_of(10.0, [600.0, 200.0]) == 2
    with pytest.raises(QcacheError, match="quant.time_groups: 3 groups need at least 3 distinct timesteps"):
        group_rows([1, 1, 2], 3)


@pytest.mark.parametrize("outputs", [False, True], ids=["inputs", "inputs+outputs"])
def test_two_groups_save_and_reload_bit_exactly_and_switch_by_timestep(tmp_path, outputs):
    cfg = QuantConfig(preset="W8A8", time_groups=2, quantize_outputs=outputs)
    m = quantize_transformer(tiny_dit(), cfg, calib_set())
    one = quantize_transformer(tiny_dit(), QuantConfig(preset="W8A8", quantize_outputs=outputs), calib_set())
    tg = m.qcache_quant["time_groups"]
    assert tg["groups"] == 2 and len(tg["edges"]) == 1 and 0 < tg["edges"][0] < 997
    names = [n for n, s in m.qcache_quant["modules"].items() if s["activations"] == "int8"]
    scales = torch.stack([getattr(m.get_submodule(n), IN_BUF) for n in names])  # (modules, 2)
    assert scales.shape == (len(names), 2) and not torch.equal(scales[:, 0], scales[:, 1])  # groups differ
    # the ungrouped scale is the one-group model's, and a call leaves it in place
    before = {t: _fwd(m, t) for t in (900, 100)}
    for n in names:
        assert torch.equal(m.get_submodule(n).input_scale, one.get_submodule(n).input_scale)
    assert not torch.equal(before[100], _fwd(one, 100)) or not torch.equal(before[900], _fwd(one, 900))
    out = save_quantized(m, tmp_path / "q")
    qmap = json.loads((out / "quant_map.json").read_text())
    assert qmap["time_groups"] == tg and len(qmap["group_ranges"]) == 2
    r = load_quantized(out)
    for t in (900, 100):
        assert torch.equal(_fwd(r, t), before[t])
    from qcache.quant.time_groups import group_state
    sd_m, sd_r = {**m.state_dict(), **group_state(m)}, {**r.state_dict(), **group_state(r)}
    assert sd_m.keys() == sd_r.keys() and any(k.endswith(IN_BUF) for k in sd_r)
    assert all(torch.equal(sd_m[k], sd_r[k]) for k in sd_m if not hasattr(sd_m[k], "_data"))
    save_quantized(r, tmp_path / "q2")  # saved again after sampling: the same bytes
    assert (tmp_path / "q2" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_one_group_leaves_the_quant_map_and_weights_as_before(tmp_path):
    m = quantize_transformer(tiny_dit(), QuantConfig(preset="W8A8", time_groups=1), calib_set())
    out = save_quantized(m, tmp_path / "q")
    assert "time_groups" not in json.loads((out / "quant_map.json").read_text())
    from qcache.quant.time_groups import group_state
    assert group_state(m) == {}


def test_time_groups_errors_are_one_line():
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"model": {}, "quant": {"backend": "torchao", "time_groups": 2}})
    assert str(e.value) == ("quant.time_groups: backend torchao has no static activation scales to group by "
                            "timestep (only backend quanto does), got 2")
    with pytest.raises(RecipeError, match="quant.time_groups: must be >= 1, got 0"):
        recipe_from_dict({"model": {}, "quant": {"time_groups": 0}})
    with pytest.raises(QcacheError, match="quant.time_groups: 2 groups need activation-quantized modules"):
        quantize_transformer(tiny_dit(), QuantConfig(preset="W8", time_groups=2), calib_set())
