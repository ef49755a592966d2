"""Quantization: plans, observers, scales, exact save/load for every preset, checkpoint ratios, recipe errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save

from qcache.errors import QcacheError
from qcache.quant import (
    AbsmaxObserver,
    PercentileObserver,
    checkpoint_bytes,
    load_quantized,
    observe_ranges,
    plan_quantization,
    quantize_transformer,
    run_calibration,
    save_quantized,
)
from qcache.recipe import QuantConfig, QuantOverride, RecipeError, recipe_from_dict
from tests.conftest import tiny_dit


def calib_set(n: int = 24, seed: int = 0):
    from datasets import Array3D, Dataset, Features, Value

    g = torch.Generator().manual_seed(seed)
    feats = Features({"x": Array3D((1, 8, 8), "float32"), "timestep": Value("int64"),
                      "class_label": Value("int64")})
    return Dataset.from_dict({"x": (2 * torch.randn(n, 1, 8, 8, generator=g)).numpy(),
                              "timestep": (np.arange(n) * 997 // max(n - 1, 1)).astype(np.int64),
                              "class_label": np.arange(n) % 10}, features=feats)


def model_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 8, 8, generator=g)
    return x, torch.tensor([0, 20, 400, 700, 980, 999]), torch.tensor([1, 2, 3, 10, 10, 10])


def forward(m, inputs):
    x, t, y = inputs
    with torch.no_grad():
        return m(x, timestep=t, class_labels=y, return_dict=False)[0]


@pytest.mark.parametrize("cfg", [
    QuantConfig(preset="W8A8"), QuantConfig(preset="W4A8"), QuantConfig(preset="W8"), QuantConfig(preset="W4"),
    QuantConfig(preset="W8A8", quantize_outputs=True, observer="percentile", percentile=99.9),
    QuantConfig(preset="W8A8", keep_dtype="float32", conditioning_weights="none"),
], ids=["W8A8", "W4A8", "W8", "W4", "W8A8-outputs-percentile", "W8A8-fp32-keep"])
def test_reload_is_bit_identical(tmp_path, cfg):
    m = quantize_transformer(tiny_dit(), cfg, calib_set())
    inputs = model_inputs()
    before = forward(m, inputs)
    out = save_quantized(m, tmp_path / "q")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "quant_map.json"]
    qmap = json.loads((out / "quant_map.json").read_text())
    assert qmap["preset"] == cfg.preset and qmap["modules"]
    acts = [s for s in qmap["modules"].values() if s["activations"] == "int8"]
    assert bool(acts) == ("A8" in cfg.preset)
    assert all(s["quantize_output"] == cfg.quantize_outputs for s in acts)
    r = load_quantized(out)
    after = forward(r, inputs)
    assert torch.equal(before, after)
    assert torch.equal(r.pos_embed.pos_embed, m.pos_embed.pos_embed)  # the non-persistent buffer survived
    for name in qmap["modules"]:
        a, b = m.get_submodule(name), r.get_submodule(name)
        assert torch.equal(a.input_scale, b.input_scale) and torch.equal(a.output_scale, b.output_scale)
    # and the quantization did something, within the error its bit width allows (relative L2 to full precision;
    # measured about 3e-4 for 8-bit and 2e-3 for 4-bit weights on this model)
    fp = forward(tiny_dit(), inputs)
    rel = float((before - fp).norm() / fp.norm())
    assert 1e-6 < rel < (2e-3 if cfg.preset.startswith("W8") else 1e-2)


def test_reload_into_given_base_model_and_twice(tmp_path):
    m = quantize_transformer(tiny_dit(), QuantConfig(preset="W8A8"), calib_set())
    save_quantized(m, tmp_path / "q")
    save_quantized(m, tmp_path / "q")  # overwriting is atomic and leaves no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    r = load_quantized(tmp_path / "q", base=lambda: tiny_dit(seed=5))
    assert torch.equal(forward(m, model_inputs()), forward(r, model_inputs()))


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(QcacheError, match="load_quantized: cannot read"):
        load_quantized(tmp_path / "missing")
    m = quantize_transformer(tiny_dit(), QuantConfig(preset="W8"))
    save_quantized(m, tmp_path / "q")
    with pytest.raises(QcacheError, match="does not match"):
        load_quantized(tmp_path / "q", base=lambda: tiny_dit(layers=1))


def test_absmax_observer_is_the_true_absmax():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(7, 13, generator=g) * s for s in (1.0, 5.0, 0.1)]
    o = AbsmaxObserver()
    for c in chunks:
        o.update(c)
    assert o.value() == float(torch.cat(chunks).abs().max())


def test_percentile_observer_within_one_bin_of_exact():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(200_000, generator=g) ** 3
    for q in (99.0, 99.9):
        o = PercentileObserver(q)
        for p in range(2):
            for c in data.chunk(10):
                o.update(c, p)
        exact = float(np.percentile(data.abs().numpy(), q, method="higher"))
        width = float(data.abs().max()) / o.bins
        assert exact - 1e-4 <= o.value() <= exact + width + 1e-4, (o.value(), exact, width)
    o = PercentileObserver(100.0)
    for p in range(2):
        o.update(data, p)
    assert o.value() == float(data.abs().max())


def test_observed_ranges_and_written_scales_match_the_data_fed():
    model = tiny_dit()
    calib = calib_set()
    name = "transformer_blocks.1.ff.net.2"
    seen_in, seen_out = [], []
    mod = model.get_submodule(name)
    h1 = mod.register_forward_pre_hook(lambda m, a: seen_in.append(a[0].clone()))
    h2 = mod.register_forward_hook(lambda m, a, o: seen_out.append(o.clone()))
    run_calibration(model, calib)
    h1.remove(), h2.remove()
    true_in = float(torch.cat([s.flatten() for s in seen_in]).abs().max())
    true_out = float(torch.cat([s.flatten() for s in seen_out]).abs().max())
    assert len(seen_in) == 1 and seen_in[0].shape[0] == 2 * len(calib)  # CFG: conditional + null in one batch
    ranges = observe_ranges(model, [name], lambda: run_calibration(model, calib))
    assert ranges[name] == {"input": true_in, "output": true_out}
    # keep_dtype float32: nothing is rounded before observing, so the ranges are those of this exact model
    q = quantize_transformer(model, QuantConfig(preset="W8A8", keep_dtype="float32"), calib)
    qm = q.get_submodule(name)
    assert float(qm.input_scale) == pytest.approx(true_in / 127, rel=1e-6)
    assert float(qm.output_scale) == pytest.approx(true_out / 127, rel=1e-6)
    assert q.qcache_quant["ranges"][name]["input"] == true_in


def test_default_plan_keeps_conditioning_unquantized_activations_and_io_layers_full_precision():
    m = tiny_dit()
    plan = plan_quantization(m, QuantConfig(preset="W8A8"))
    assert plan["transformer_blocks.0.attn1.to_q"] == {"weights": "int8", "activations": "int8"}
    assert plan["transformer_blocks.0.ff.net.2"] == {"weights": "int8", "activations": "int8"}
    assert plan["transformer_blocks.0.norm1.linear"] == {"weights": "int8", "activations": "none"}
    assert plan["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"]["activations"] == "none"
    assert not any(n.startswith(("pos_embed", "proj_out")) for n in plan)
    assert not any("norm" in n and not n.endswith(("norm1.linear",)) and ".emb." not in n for n in plan)
    w4 = plan_quantization(m, QuantConfig(preset="W4A8"))
    assert w4["transformer_blocks.0.norm1.linear"]["weights"] == "int4"
    fp_cond = plan_quantization(m, QuantConfig(preset="W8A8", conditioning_weights="none"))
    assert not any("norm1" in n for n in fp_cond)
    ov = plan_quantization(m, QuantConfig(preset="W8A8", exclude=["*.ff.*"], overrides=[
        QuantOverride(pattern="transformer_blocks.1.*", weights="int4"),
        QuantOverride(pattern="transformer_blocks.1.attn1.to_q", weights="int8", activations="int8")]))
    assert not any(".ff." in n and n.startswith("transformer_blocks.0") for n in ov)
    assert ov["transformer_blocks.1.ff.net.2"] == {"weights": "int4", "activations": "none"}
    assert ov["transformer_blocks.1.attn1.to_q"] == {"weights": "int8", "activations": "int8"}
    assert plan_quantization(m, QuantConfig(preset="none")) == {}


def test_bad_quant_sections_are_rejected_clearly():
    cases = [
        ({"preset": "W3A8"}, "quant.preset: must be one of 'W8A8', 'W4A8', 'W8', 'W4', 'none', got 'W3A8'"),
        ({"observer": "ema"}, "quant.observer: must be one of 'absmax', 'percentile', got 'ema'"),
        ({"percentile": 101}, "quant.percentile: must be <= 100.0, got 101"),
        ({"overrides": [{"pattern": "*", "weights": "int2"}]}, "quant.overrides[0].weights: must be one of"),
        ({"overrides": [{"pattern": "*", "weights": "none", "activations": "int8"}]},
         "quant.overrides[0].activations: int8 activations need quantized weights"),
        ({"overrides": [{"weights": "int8"}]}, "quant.overrides[0].pattern: required key is missing"),
        ({"exclude": "proj_out*"}, "quant.exclude: must be a list, got 'proj_out*'"),
        ({"keep_dtype": "int8"}, "quant.keep_dtype: must be one of"),
        ({"bits": 8}, "quant.bits: unknown key"),
    ]
    for data, msg in cases:
        with pytest.raises(RecipeError) as e:
            recipe_from_dict({"model": {}, "quant": data})
        assert str(e.value).startswith(msg), str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(QcacheError, match=r"quant.overrides\[0\].pattern: 'blocks.\*' matches no Linear"):
        plan_quantization(tiny_dit(), QuantConfig(overrides=[QuantOverride(pattern="blocks.*")]))
    with pytest.raises(QcacheError, match=r"quant.exclude\[0\]: pattern 'nope' matches no"):
        plan_quantization(tiny_dit(), QuantConfig(exclude=["nope"]))
    with pytest.raises(QcacheError, match="quant.preset: W8A8 quantizes activations and needs a non-empty"):
        quantize_transformer(tiny_dit(), QuantConfig(preset="W8A8"), None)


def digits_sized_dit():
    """A random model with the embedded digits model's architecture (6 blocks of width 128)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1,
                              num_layers=6, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m.eval().requires_grad_(False)


def test_checkpoint_ratios_on_the_digits_architecture(tmp_path):
    fp32 = len(save({k: v.contiguous() for k, v in digits_sized_dit().state_dict().items()}))
    ratios = {}
    for preset in ("W8", "W4"):
        m = quantize_transformer(digits_sized_dit(), QuantConfig(preset=preset))
        ratios[preset] = fp32 / checkpoint_bytes(save_quantized(m, tmp_path / preset))
    assert ratios["W8"] >= 3.5, ratios
    assert ratios["W4"] >= 6.0, ratios


@pytest.mark.parametrize("k", [128, 512, 2048])
def test_exact_int_mm_equals_torch_int_mm(k):
    from qcache.quant import exact_int_mm

    g = torch.Generator().manual_seed(k)
    a = torch.randint(-128, 128, (64, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, 32), generator=g, dtype=torch.int8)
    a[0] = -128  # the worst case: every product 16384
    b[:, 0] = -128
    assert torch.equal(exact_int_mm(a, b), torch._int_mm(a, b))


@pytest.mark.parametrize("route", ["native", "float"])
def test_cpu_int_mm_route_from_the_environment(monkeypatch, route):
    from qcache.quant import kernels

    monkeypatch.setenv(kernels.ROUTE_ENV, route)
    kernels.chosen_cpu_int_mm_route.cache_clear()
    try:
        assert kernels.cpu_int_mm_route() == route
    finally:
        kernels.chosen_cpu_int_mm_route.cache_clear()


def test_cpu_int_mm_route_rejects_unknown_values(monkeypatch):
    from qcache.quant import kernels

    monkeypatch.setenv(kernels.ROUTE_ENV, "fastest")
    kernels.chosen_cpu_int_mm_route.cache_clear()
    try:
        with pytest.raises(QcacheError, match="QCACHE_CPU_INT_MM: must be one of auto, native, float, got 'fastest'"):
            kernels.cpu_int_mm_route()
    finally:
        kernels.chosen_cpu_int_mm_route.cache_clear()
    with pytest.raises(QcacheError, match="forced_cpu_int_mm_route: route must be native or float, got 'auto'"):
        with kernels.forced_cpu_int_mm_route("auto"):
            pass


def test_forced_route_overrides_the_choice_inside_its_block_only():
    from qcache.quant import kernels

    chosen = kernels.cpu_int_mm_route()
    other = "float" if chosen == "native" else "native"
    with kernels.forced_cpu_int_mm_route(other):
        assert kernels.cpu_int_mm_route() == other
        with kernels.forced_cpu_int_mm_route(chosen):
            assert kernels.cpu_int_mm_route() == chosen
        assert kernels.cpu_int_mm_route() == other
    assert kernels.cpu_int_mm_route() == chosen


def test_both_cpu_int_mm_routes_give_the_same_w8a8_model_output(monkeypatch):
    """The route is a speed choice only: a quanto W8A8 model gives bit-identical outputs on either."""
    from qcache.quant import kernels

    model = quantize_transformer(tiny_dit(), QuantConfig(preset="W8A8"), calib_set())
    calls, native_mm = [], torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or native_mm(a, b))
    outs = {}
    for route in ("native", "float"):
        with kernels.forced_cpu_int_mm_route(route):
            outs[route] = forward(model, model_inputs())
        if route == "native":
            assert calls, "the native route did not reach torch._int_mm"
            calls.clear()
    assert not calls  # the float route never calls torch._int_mm
    assert torch.equal(outs["native"], outs["float"])
    assert outs["native"].abs().sum() > 0


def test_scoped_quanto_cpu_path_is_bit_identical_to_quanto_and_restored_exactly():
    """Inside the scope, activation quantization (one temporary) and the int32 -> float epilogue (one pass) are
    qcache's; a W8A8 model's output equals quanto's own path bit for bit, and the library is restored as it was."""
    import inspect

    from optimum.quanto.tensor.activations.qbytes import ActivationQBytesQuantizer
    from optimum.quanto.tensor.weights.qbytes import WeightQBytesLinearFunction

    from qcache.quant import kernels

    x = torch.randn(64, 32) * 3
    x[0, :4] = torch.tensor([0.5, 1.5, -2.5, 2.5]) * 0.05  # ties round to even
    scale = torch.tensor(0.05)
    assert torch.equal(kernels.quantize_activation_int8(x, scale),
                       torch.ops.quanto.quantize_symmetric(x, dtype=torch.int8, axis=None, scale=scale))
    model = quantize_transformer(tiny_dit(), QuantConfig(preset="W8A8"), calib_set())
    classes = (ActivationQBytesQuantizer, WeightQBytesLinearFunction)
    before = [inspect.getattr_static(c, "forward") for c in classes]
    with kernels.exact_cpu_int_mm():
        assert all(inspect.getattr_static(c, "forward") is not b for c, b in zip(classes, before))
        ours = forward(model, model_inputs())
    assert all(inspect.getattr_static(c, "forward") is b for c, b in zip(classes, before))
    hooks = (model._forward_pre_hooks.copy(), model._forward_hooks.copy())
    model._forward_pre_hooks.clear(), model._forward_hooks.clear()  # quanto's own path, no qcache scope
    try:
        theirs = forward(model, model_inputs())
    finally:
        model._forward_pre_hooks.update(hooks[0]), model._forward_hooks.update(hooks[1])
    assert torch.equal(ours, theirs) and ours.abs().sum() > 0


def test_importing_qcache_patches_no_library_and_models_scope_the_exact_route():
    """The exact CPU int8 route is swapped in only while a quantized model runs (issue: no import-time patching)."""
    import subprocess
    import sys

    code = ("import optimum.quanto.library.qbytes_mm as m; f = m.qbytes_int_mm; import qcache, qcache.quant, "
            "qcache.compress; assert m.qbytes_int_mm is f, 'patched at import'")
    subprocess.run([sys.executable, "-c", code], check=True)

    from optimum.quanto.library import qbytes_mm

    from qcache.quant import kernels

    original = qbytes_mm.qbytes_int_mm
    seen = []
    model = torch.nn.Linear(4, 4)
    model.register_forward_hook(lambda *a: seen.append(qbytes_mm.qbytes_int_mm))
    kernels.use_exact_cpu_int_mm(kernels.use_exact_cpu_int_mm(model))  # idempotent: one pair of hooks
    assert len(model._forward_pre_hooks) == 1
    model(torch.ones(1, 4))
    assert seen == [kernels._qbytes_int_mm] and qbytes_mm.qbytes_int_mm is original
    with pytest.raises(RuntimeError):
        model(torch.ones(1, 3))  # a failing forward restores the library's function too
    assert qbytes_mm.qbytes_int_mm is original
    with kernels.exact_cpu_int_mm():
        with kernels.exact_cpu_int_mm():
            assert qbytes_mm.qbytes_int_mm is kernels._qbytes_int_mm
        assert qbytes_mm.qbytes_int_mm is kernels._qbytes_int_mm  # re-entrant: the outer block still holds it
    assert qbytes_mm.qbytes_int_mm is original
