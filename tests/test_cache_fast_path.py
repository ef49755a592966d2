"""The lean cached-step path (qcache/cache/fast_path.py): same result as the module hooks, less work, and the
fused (compiled) variant within float rounding of it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qcache.cache import attach_cache, fused
from qcache.recipe import CacheConfig, SamplingConfig
from qcache.sampling import Sampler
from tests.conftest import SCHEDULER_CONFIG, tiny_dit

POLICIES = [CacheConfig(policy="fora", interval=3), CacheConfig(policy="taylorseer", interval=3),
            CacheConfig(policy="rfc", rcs=False, interval=3), CacheConfig(policy="rfc", tau=0.05),
            CacheConfig(policy="rfc", rfe=False, tau=0.05), CacheConfig(policy="rfc", order=1, tau=0.05)]


def sampler(steps: int = 12, batch_size: int = 4, dtype: torch.dtype = torch.float32) -> Sampler:
    return Sampler(tiny_dit(layers=3).to(dtype), SCHEDULER_CONFIG, SamplingConfig(steps=steps, batch_size=batch_size))


def sample(s: Sampler, cfg: CacheConfig, n: int = 6):
    cache = attach_cache(s.transformer, cfg)
    try:
        with s.extra_hooks(cache):
            out = s.sample(n, seed=3, progress=False).images
    finally:
        cache.remove()
    return out, cache


@pytest.mark.parametrize("cfg", POLICIES, ids=lambda c: f"{c.policy}-rfe{c.rfe}-rcs{c.rcs}-m{c.order}")
def test_fast_path_is_bit_identical_to_the_module_hooks(cfg):
    s = sampler()
    slow, c_slow = sample(s, dataclasses.replace(cfg, fast_path=False))
    fast, c_fast = sample(s, cfg)
    assert c_fast._fast_blocks and not c_slow._fast_blocks
    assert c_fast.stats.nfc_per_generation() == c_slow.stats.nfc_per_generation()
    assert max(c_fast.stats.nfc_per_generation()) < 12  # steps really were cached
    assert torch.equal(fast, slow)


def test_fast_path_skips_the_block_work_no_forecast_reads(monkeypatch):
    """On cached steps the block's own LayerNorm modules never run; the lean path normalises only the inputs a
    forecast reads: none for FORA, attn1's and ff's of every block for RFE."""
    from qcache.cache import fast_path

    lean = []
    real = fast_path.layer_norm
    monkeypatch.setattr(fast_path, "layer_norm", lambda norm, x: lean.append(1) or real(norm, x))
    s = sampler()
    module_calls = []
    h = s.transformer.transformer_blocks[1].norm3.register_forward_hook(lambda *a: module_calls.append(1))
    try:
        for cfg, per_cached_step in ((CacheConfig(policy="fora", interval=3), 0),
                                     (CacheConfig(policy="rfc", rcs=False, interval=3), 2 * 3)):
            lean.clear()
            module_calls.clear()
            _, cache = sample(s, cfg, n=4)
            nfc = cache.stats.nfc_per_generation()[0]
            assert len(module_calls) == nfc  # full steps only
            assert len(lean) == (12 - nfc) * per_cached_step
    finally:
        h.remove()


def test_workspace_holds_at_most_two_activation_buffers():
    s = sampler()
    cache = attach_cache(s.transformer, CacheConfig(policy="rfc", rcs=False, interval=3))
    with s.extra_hooks(cache):
        s.sample(4, progress=False)
    act = 4 * 2 * 16 * 16 * 4  # images x CFG halves x tokens x width x fp32 bytes
    assert cache.workspace.nbytes() == 2 * act
    cache.remove()
    assert cache.workspace.nbytes() == 0


def test_fast_path_in_bfloat16_matches_the_module_hooks():
    s = sampler(steps=8, dtype=torch.bfloat16)
    cfg = CacheConfig(policy="rfc", rcs=False, interval=3)
    slow, _ = sample(s, dataclasses.replace(cfg, fast_path=False), n=2)
    fast, _ = sample(s, cfg, n=2)
    assert torch.equal(fast, slow)


def test_store_dtype_model_keeps_a_bf16_models_state_in_bf16():
    """``store_dtype: model`` (the default): a bf16 model's differences and RFE's last input stay bf16 (half the
    bytes of float32, nothing lost: the values are bf16), a float32 model's stay float32."""
    for dtype, cfg_store, want in ((torch.bfloat16, "model", torch.bfloat16), (torch.float32, "model", torch.float32),
                                   (torch.bfloat16, "float32", torch.float32)):
        s = sampler(steps=8, dtype=dtype)
        cache = attach_cache(s.transformer, CacheConfig(policy="rfc", rcs=False, interval=3, store_dtype=cfg_store))
        with s.extra_hooks(cache):
            s.sample(2, seed=3, progress=False)
        st = next(iter(cache._states.values()))
        assert st.forecaster.diffs.dtype == want and st.forecaster.diffs.shape[1] == 2
        assert st.rfe.last_input.dtype == dtype  # the model's own input, not an upcast copy
        cache.remove()


@pytest.mark.parametrize("store", ["model", "float32"])
def test_fused_step_functions_in_bfloat16_match_the_eager_path(store, monkeypatch):
    monkeypatch.setattr(fused, "BACKEND", "eager")
    fused.compiled.cache_clear()
    s = sampler(steps=8, dtype=torch.bfloat16)
    cfg = CacheConfig(policy="rfc", rcs=False, interval=3, store_dtype=store)
    eager, _ = sample(s, cfg, n=2)
    comp, _ = sample(s, dataclasses.replace(cfg, compile=True), n=2)
    fused.compiled.cache_clear()
    torch.testing.assert_close(comp.float(), eager.float(), rtol=0, atol=1e-3)  # FORA is 9e-3 away


@pytest.mark.parametrize("cfg", POLICIES[:4], ids=lambda c: f"{c.policy}-rfe{c.rfe}-rcs{c.rcs}")
def test_fused_step_functions_match_the_eager_path(cfg, monkeypatch):
    """``cache.compile``: the fused step functions, traced by dynamo (backend ``eager``: no code generation in
    the tests), give the eager result within float rounding and the same schedule."""
    monkeypatch.setattr(fused, "BACKEND", "eager")
    fused.compiled.cache_clear()
    s = sampler()
    eager, c_eager = sample(s, cfg)
    comp, c_comp = sample(s, dataclasses.replace(cfg, compile=True))
    fused.compiled.cache_clear()
    assert c_comp.stats.nfc_per_generation() == c_eager.stats.nfc_per_generation()
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", ["fast_path", "compile"])
def test_recipe_keys_are_booleans(key):
    from qcache.recipe import RecipeError, recipe_from_dict

    assert getattr(recipe_from_dict({"model": {}, "cache": {"policy": "fora", key: False}}).cache, key) is False
    with pytest.raises(RecipeError, match=rf"cache\.{key}: must be true or false, got 'yes'"):
        recipe_from_dict({"model": {}, "cache": {"policy": "fora", key: "yes"}})


@pytest.mark.parametrize("shape", [(3, 20), (3, 4, 5), (3, 2, 4, 5)])
def test_fused_sample_distance_is_the_per_sample_norm(shape):
    a, b = torch.randn(shape), torch.randn(shape)
    want = torch.linalg.vector_norm((a - b).reshape(3, -1), dim=1)
    torch.testing.assert_close(fused._sample_dist(a, b), want)
    a16, b16 = a.bfloat16(), b.bfloat16()  # taken in float32
    want16 = torch.linalg.vector_norm((a16.float() - b16.float()).reshape(3, -1), dim=1)
    torch.testing.assert_close(fused._sample_dist(a16, b16), want16)
