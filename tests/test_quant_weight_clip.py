"""quant.weight_clip: search: int4 weight groups clipped to the alpha that minimises their calibration output error."""

from __future__ import annotations

import json

import pytest
import torch
from optimum.quanto import freeze, qint4
from optimum.quanto.nn import quantize_module
from optimum.quanto.tensor.optimizers import MaxOptimizer

from qcache.errors import QcacheError
from qcache.quant import load_quantized, quantize_transformer, save_quantized
from qcache.quant.weight_clip import GRID, ClipSearchOptimizer, GramCollector, clip_errors, group_length
from qcache.recipe import QuantConfig, RecipeError, recipe_from_dict
from tests.conftest import tiny_dit
from tests.test_quant import calib_set, forward, model_inputs


def _layer(in_features: int = 256, out_features: int = 16, seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor]:
    """A Linear whose weight groups each hold one large outlier, and inputs with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.05)
        lin.weight[:, ::97] *= 12  # outliers
    x = torch.randn(512, in_features, generator=g) * torch.linspace(0.2, 2.0, in_features)
    return lin, x


def _quantized_output(lin: torch.nn.Linear, x: torch.Tensor, optimizer) -> torch.Tensor:
    q = quantize_module(torch.nn.Linear(lin.in_features, lin.out_features, bias=False), weights=qint4,
                        optimizer=optimizer)
    with torch.no_grad():
        q.weight.copy_(lin.weight)
        freeze(q)
        return q(x)


def test_group_length_follows_quanto():
    assert group_length(128) == 128 and group_length(64) == 64  # per output channel: the whole row
    assert group_length(256) == 128 and group_length(3072) == 128 and group_length(12288) == 128
    assert group_length(480) == 96 and group_length(200) == 200  # no multiple of 32 >= 32 divides 200


def test_alpha_one_is_quantos_own_minmax():
    lin, _ = _layer()
    w = lin.weight.reshape(-1, 128)
    gram = torch.eye(128, dtype=torch.float64).expand(2, 128, 128)
    _, scales, shifts = clip_errors(w, gram, 4)
    scale, shift = MaxOptimizer()(lin.weight, qtype=qint4, axis=0, group_size=128)
    one = GRID.index(1.0)
    assert torch.allclose(scales[one].float(), scale, rtol=0, atol=1e-7) and torch.equal(shifts[one].float(), shift)


def test_search_lowers_every_groups_calibration_error_and_the_layer_output_error():
    lin, x = _layer()
    collector = GramCollector({"l": lin}, {"l": group_length(lin.in_features)})
    with collector.attached(), torch.no_grad():
        ref = lin(x)
    gram = collector.grams["l"]
    assert gram.shape == (2, 128, 128) and collector.rows["l"] == 512
    blocks = x.double().reshape(512, 2, 128).transpose(0, 1)
    assert torch.allclose(gram, blocks.transpose(1, 2) @ blocks)
    errs, _, _ = clip_errors(lin.weight.reshape(-1, 128), gram, 4)
    opt = ClipSearchOptimizer(gram)
    plain = _quantized_output(lin, x, MaxOptimizer())
    searched = _quantized_output(lin, x, opt)
    chosen = errs.min(0).values
    assert torch.all(chosen <= errs[GRID.index(1.0)])  # never worse than no clipping, group by group
    assert opt.alphas is not None and opt.alphas.shape == (32,) and float(opt.alphas.min()) < 1.0
    e_plain, e_search = float((plain - ref).pow(2).sum()), float((searched - ref).pow(2).sum())
    assert e_search < 0.95 * e_plain, (e_search, e_plain)  # 0.89 here


def test_grid_must_contain_no_clipping():
    with pytest.raises(ValueError, match="must contain 1.0"):
        ClipSearchOptimizer(torch.eye(4, dtype=torch.float64)[None], grid=(0.9, 0.8))


def test_w4a8_with_search_differs_records_its_choice_and_reloads_bit_exactly(tmp_path):
    inputs = model_inputs()
    plain = quantize_transformer(tiny_dit(), QuantConfig(preset="W4A8"), calib_set())
    m = quantize_transformer(tiny_dit(), QuantConfig(preset="W4A8", weight_clip="search"), calib_set())
    info = m.qcache_quant["weight_clip"]
    int4 = {n for n, s in m.qcache_quant["modules"].items()
            if s["weights"] == "int4" and isinstance(m.get_submodule(n), torch.nn.Linear)}
    assert info["method"] == "search" and set(info["modules"]) == int4 and info["grid"][0] == 1.0
    assert any(v["clipped"] > 0 for v in info["modules"].values())
    assert all(m.get_submodule(n).optimizer is None for n in int4)  # the Gram matrices are not kept
    out = forward(m, inputs)
    assert not torch.equal(out, forward(plain, inputs))
    d = save_quantized(m, tmp_path / "q")
    assert json.loads((d / "quant_map.json").read_text())["weight_clip"] == info
    assert torch.equal(forward(load_quantized(d), inputs), out)
    # without the search nothing of it is recorded
    assert "weight_clip" not in json.loads((save_quantized(plain, tmp_path / "p") / "quant_map.json").read_text())


def test_weight_clip_errors_are_one_line():
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"model": {}, "quant": {"backend": "torchao", "weight_clip": "search"}})
    assert str(e.value) == ("quant.weight_clip: backend torchao has no int4 weights to clip (only backend quanto "
                            "does), got 'search'")
    with pytest.raises(RecipeError, match="quant.weight_clip: must be one of"):
        recipe_from_dict({"model": {}, "quant": {"weight_clip": "gptq"}})
    with pytest.raises(QcacheError, match="quant.weight_clip: search applies to int4 Linear weights; preset W8A8"):
        quantize_transformer(tiny_dit(), QuantConfig(preset="W8A8", weight_clip="search"), calib_set())
    with pytest.raises(QcacheError, match="quant.weight_clip: search needs a non-empty calibration set"):
        quantize_transformer(tiny_dit(), QuantConfig(preset="W4", weight_clip="search"), None)


def test_weights_only_w4_with_search_needs_calibration():
    from qcache.pipeline import needs_calibration

    fp = tiny_dit()
    assert not needs_calibration(recipe_from_dict({"model": {}, "quant": {"preset": "W4"}}), fp)
    assert needs_calibration(recipe_from_dict({"model": {}, "quant": {"preset": "W4", "weight_clip": "search"}}), fp)


def test_grams_are_summed_across_processes_in_rank_order():
    from qcache.quant.observers import reduced_across
    from qcache.quant.weight_clip import collect_grams

    lin, x = _layer()
    halves = [x[:200], x[200:]]
    alone = collect_grams({"l": lin}, lambda: lin(x))["l"]
    other = collect_grams({"l": lin}, lambda: lin(halves[1]))
    sent = []

    def exchange(obj):  # this process is rank 0 with the first rows; rank 1 had the others; rank 2 saw none
        sent.append(obj)
        return [obj, other, None]

    with reduced_across(exchange):
        merged = collect_grams({"l": lin}, lambda: lin(halves[0]))["l"]
    assert len(sent) == 1 and torch.allclose(merged, alone, rtol=1e-12)
    with reduced_across(lambda obj: [None, None]), pytest.raises(ValueError, match="no process observed"):
        collect_grams({"l": lin}, lambda: None)
