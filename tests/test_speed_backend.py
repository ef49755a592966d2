"""The torchao speed backend: recipe keys, plan, bit-identical save/load (alone and in an artifact), exact CPU GEMM,
regional compilation under the feature cache. Skipped where torchao is not installed (an optional extra)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from qcache.errors import QcacheError
from qcache.recipe import CacheConfig, QuantConfig, RecipeError, SamplingConfig, recipe_from_dict
from tests.conftest import SCHEDULER_CONFIG, tiny_dit

AO = QuantConfig(backend="torchao")


def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(6, 1, 8, 8, generator=g), torch.tensor([0, 20, 400, 700, 980, 999]),
            torch.tensor([1, 2, 3, 10, 10, 10]))


def forward(m, xs):
    x, t, y = xs
    dtype = next(m.parameters()).dtype
    with torch.no_grad():
        return m(x.to(dtype), timestep=t, class_labels=y, return_dict=False)[0]


@pytest.mark.parametrize("data, message", [
    ({"compute_dtype": "bfloat16"}, "quant.compute_dtype: needs backend torchao, got 'bfloat16' with backend 'quanto'"),
    ({"compile": True}, "quant.compile: needs backend torchao, got True with backend 'quanto'"),
    ({"float8": True}, "quant.float8: needs backend torchao, got True with backend 'quanto'"),
    ({"backend": "tensorrt"}, "quant.backend: must be one of 'quanto', 'torchao', got 'tensorrt'"),
    ({"backend": "torchao", "preset": "W4A8"}, "quant.preset: backend torchao supports W8A8, W8 and none, got 'W4A8'"),
    ({"backend": "torchao", "conditioning_weights": "int4"}, "quant.conditioning_weights: backend torchao has no int4"),
    ({"backend": "torchao", "overrides": [{"pattern": "*", "weights": "int4"}]},
     "quant.overrides[0].weights: backend torchao has no int4"),
    ({"backend": "torchao", "quantize_outputs": True}, "quant.quantize_outputs: backend torchao quantizes"),
    ({"backend": "torchao", "observer": "percentile"}, "quant.observer: backend torchao takes activation ranges"),
    ({"backend": "torchao", "compute_dtype": "int8"}, "quant.compute_dtype: must be one of"),
])
def test_bad_speed_keys_are_one_line_errors(data, message):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"model": {}, "quant": data})
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_defaults_keep_the_quanto_backend():
    q = recipe_from_dict({"model": {}}).quant
    assert (q.backend, q.compute_dtype, q.compile, q.float8) == ("quanto", "model", False, False)
    ok = recipe_from_dict({"model": {}, "quant": {"backend": "torchao", "compute_dtype": "bfloat16", "compile": True}})
    assert ok.quant.backend == "torchao" and ok.quant.compile


def test_missing_torchao_is_a_one_line_error(monkeypatch):
    from qcache.quant import quantize_transformer

    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    with pytest.raises(QcacheError, match=r"^quant.backend: torchao is not installed \(pip install"):
        quantize_transformer(tiny_dit(), AO)


torchao = pytest.importorskip("torchao")

from qcache.quant import load_quantized, quantize_transformer, save_quantized  # noqa: E402
from qcache.quant.torchao_backend import compile_regions  # noqa: E402


def test_plan_dynamic_int8_for_blocks_weight_only_conditioning_fp_io():
    m = quantize_transformer(tiny_dit(), AO)
    w = {n: mod.weight for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert type(w["transformer_blocks.0.attn1.to_q"]).__name__ == "Int8Tensor"
    assert w["transformer_blocks.0.attn1.to_q"].act_quant_kwargs is not None  # activations quantized per token
    assert w["transformer_blocks.1.ff.net.2"].act_quant_kwargs is not None
    assert w["transformer_blocks.0.norm1.linear"].act_quant_kwargs is None  # conditioning: weight-only
    assert type(w["proj_out_2"]) is torch.nn.Parameter  # io layers stay floating point
    assert m.qcache_quant["format"] == "qcache-torchao/1" and m.qcache_quant["calibration_rows"] == 0
    ref = forward(tiny_dit(), inputs())
    out = forward(m, inputs())
    assert 0 < (out - ref).norm() / ref.norm() < 0.05  # quantized, and close


@pytest.mark.parametrize("cfg", [
    QuantConfig(backend="torchao", preset="W8A8"), QuantConfig(backend="torchao", preset="W8"),
    QuantConfig(backend="torchao", preset="W8A8", compute_dtype="bfloat16"),
    QuantConfig(backend="torchao", preset="none", compute_dtype="bfloat16"),
    QuantConfig(backend="torchao", preset="W8A8", keep_dtype="float32", conditioning_weights="none"),
], ids=["W8A8", "W8", "W8A8-bf16", "none-bf16", "W8A8-fp32-keep"])
def test_reload_is_bit_identical(tmp_path, cfg):
    m = quantize_transformer(tiny_dit(), cfg)
    before = forward(m, inputs())
    out = save_quantized(m, tmp_path / "q")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "quant_map.json"]
    qmap = json.loads((out / "quant_map.json").read_text())
    assert qmap["format"] == "qcache-torchao/1" and qmap["backend"] == "torchao"
    assert qmap["compute_dtype"] == ("float32" if cfg.compute_dtype == "model" else cfg.compute_dtype)
    r = load_quantized(out)
    assert next(r.parameters()).dtype == next(m.parameters()).dtype
    assert torch.equal(before, forward(r, inputs()))
    again = load_quantized(out, base=tiny_dit(seed=5))  # into a given model: its weights are replaced
    assert torch.equal(before, forward(again, inputs()))


def test_tampered_file_is_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    out = save_quantized(quantize_transformer(tiny_dit(), AO), tmp_path / "q")
    path = out / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    data = load_file(str(path))
    data.pop("transformer_blocks.0.attn1.to_q._weight_qdata")
    save_file(data, str(path), metadata=meta)
    with pytest.raises(QcacheError) as e:
        load_quantized(out)
    assert str(e.value).startswith("load_quantized:") and "\n" not in str(e.value)


def test_artifact_transformer_reloads_bit_identically(tmp_path):
    from qcache.artifact import load_artifact, write_artifact
    from qcache.cache import StaticSchedule
    from qcache.compressed import CompressedModel

    recipe = recipe_from_dict({"model": {"device": "cpu"}, "sampling": {"steps": 6, "batch_size": 4},
                               "quant": {"backend": "torchao"}})
    model = quantize_transformer(tiny_dit(), recipe.quant)
    sched = StaticSchedule("ddim", 6, (0, 1, 3, 5), "rfc", {"order": 2, "rfe": True, "rcs": False, "warmup": 2})
    c = CompressedModel(model, SCHEDULER_CONFIG, recipe.sampling, recipe.cache, sched, source="tiny")
    expected = c.generate(4, seed=3)
    write_artifact(tmp_path / "art", c, recipe)
    loaded = load_artifact(tmp_path / "art", device="cpu")
    assert loaded.transformer.qcache_quant["backend"] == "torchao"
    assert torch.equal(loaded.generate(4, seed=3).images, expected.images)


def test_exact_cpu_int_scaled_mm_equals_torch_int_mm():
    from torchao.kernel import intmm

    from qcache.quant import kernels

    original = intmm._int_scaled_matmul_cpu
    g = torch.Generator().manual_seed(0)
    with kernels.exact_cpu_int_mm():
        assert intmm._int_scaled_matmul_cpu is not original  # swapped inside the block only
        for k in (96, 2500):  # one chunk, and three chunks of a K beyond float32's exact range
            a = torch.randint(-128, 128, (40, k), generator=g, dtype=torch.int8)
            b = torch.randint(-128, 128, (k, 24), generator=g, dtype=torch.int8)
            a[0], b[:, 0] = -128, -128  # worst case: K * 16384 exceeds 2^24
            assert torch.equal(kernels.exact_int_mm(a, b), torch._int_mm(a, b))
            s = torch.rand(40, 1, generator=g)
            assert torch.equal(intmm._int_scaled_matmul_cpu(a, b, s), original(a, b, s))
    assert intmm._int_scaled_matmul_cpu is original


def test_float8_refused_on_cpu():
    with pytest.raises(QcacheError, match=r"^quant.float8: float8 needs a CUDA GPU"):
        quantize_transformer(tiny_dit(), QuantConfig(backend="torchao", float8=True))


def test_compiled_regions_under_the_feature_cache_match_eager():
    from qcache.cache import attach_cache
    from qcache.sampling import Sampler

    cfg = CacheConfig(policy="rfc", rcs=False, order=2, target_nfc=4, warmup=2)
    sampling = SamplingConfig(steps=8, batch_size=3)
    outs = []
    for compiled in (False, True):
        m = quantize_transformer(tiny_dit(), AO)
        if compiled:
            assert compile_regions(m, backend="eager") == 2 * 3  # norm1, attn1, ff of 2 blocks
            assert compile_regions(m, backend="eager") == 0  # idempotent
        s = Sampler(m, SCHEDULER_CONFIG, sampling)
        cache = attach_cache(m, cfg)
        with s.extra_hooks(cache):
            outs.append(s.sample(3, seed=0, progress=False).images)
        assert cache.stats.report()["nfc"] == 4
        cache.remove()
        if compiled:
            assert getattr(m.transformer_blocks[0].attn1, "_qcache_compiled", False)
            assert "forward" in m.transformer_blocks[0].attn1.__dict__  # the compiled forward survives remove()
    assert torch.equal(outs[0], outs[1])


def test_feature_cache_on_a_bfloat16_model_keeps_its_dtype():
    """Forecasts are computed in float32; a bf16 model must get bf16 back (else the next Linear fails)."""
    from qcache.cache import attach_cache
    from qcache.sampling import Sampler

    m = quantize_transformer(tiny_dit(), QuantConfig(backend="torchao", preset="none", compute_dtype="bfloat16"))
    s = Sampler(m, SCHEDULER_CONFIG, SamplingConfig(steps=8, batch_size=3))
    cache = attach_cache(m, CacheConfig(policy="rfc", rcs=False, order=2, target_nfc=4, warmup=2))
    with s.extra_hooks(cache):
        out = s.sample(3, seed=0, progress=False).images
    cache.remove()
    assert cache.stats.report()["nfc"] == 4 and torch.isfinite(out).all()


def test_compile_flag_is_saved_and_reapplied_on_load(tmp_path):
    m = quantize_transformer(tiny_dit(), QuantConfig(backend="torchao", compile=True))
    assert all(getattr(b.attn1, "_qcache_compiled", False) for b in m.transformer_blocks)
    out = save_quantized(m, tmp_path / "q")  # compiled forwards do not touch the state dict
    assert json.loads((out / "quant_map.json").read_text())["compile"] is True
    r = load_quantized(out)
    assert all(getattr(b.ff, "_qcache_compiled", False) and getattr(b.norm1, "_qcache_compiled", False)
               for b in r.transformer_blocks)
    plain = load_quantized(save_quantized(quantize_transformer(tiny_dit(), AO), tmp_path / "p"))
    assert not getattr(plain.transformer_blocks[0].attn1, "_qcache_compiled", False)


def test_compress_with_the_torchao_backend_skips_calibration_and_reloads_identically(tmp_path):
    from diffusers import DDPMScheduler

    import qcache
    from qcache.compress import compress
    from tests.test_compress import tiny_recipe

    d = tmp_path / "tiny-dit"
    tiny_dit(out_channels=2).save_pretrained(d / "transformer", safe_serialization=True)
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(d / "scheduler")
    logs: list[str] = []
    recipe = recipe_from_dict(tiny_recipe(d, tmp_path / "out", quant={"backend": "torchao"}))
    res = compress(recipe, tmp_path / "out", progress=False, log=logs.append)
    assert any("pool: skipped (quant.backend torchao quantizes activations at run time)" in m for m in logs)
    assert not (tmp_path / "out" / "stages" / "pool").exists()
    loaded = qcache.load(tmp_path / "out", device="cpu")
    assert loaded.transformer.qcache_quant["format"] == "qcache-torchao/1"
    assert torch.equal(loaded.generate(4, seed=1).images, res.compressed.generate(4, seed=1).images)
