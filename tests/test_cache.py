"""Feature caching: exactness of the forecasts and of RFE, bit-identity at tau = 0, state reset, removal,
schedules, tau tuning, accounting and the ``full_step`` flag."""

from __future__ import annotations

import json

import pytest
import torch

from qcache.cache import (
    Forecaster,
    RelationalEstimator,
    StaticSchedule,
    attach_cache,
    cache_layout,
    cache_sampler,
    executed_flops,
    interval_full_steps,
    record_schedule,
    replay,
    tune_tau,
    uniform_full_steps,
)
from qcache.errors import QcacheError
from qcache.recipe import CacheConfig, SamplingConfig
from qcache.sampling import Sampler, SamplerHook
from tests.conftest import SCHEDULER_CONFIG, tiny_dit


def make_sampler(steps: int = 12, batch_size: int = 4, **kw) -> Sampler:
    return Sampler(tiny_dit(**kw), SCHEDULER_CONFIG, SamplingConfig(steps=steps, batch_size=batch_size))


def run(sampler: Sampler, cfg: CacheConfig | None, n: int = 4, seed: int = 0, **attach_kw):
    cache = None
    if cfg is not None:
        cache = attach_cache(sampler.transformer, cfg, **attach_kw)
        sampler.hooks.append(cache)
    try:
        return sampler.sample(n, seed=seed, progress=False).images, cache
    finally:
        if cache is not None:
            sampler.hooks.remove(cache)
            cache.remove()


# ---- forecasts ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_order_m_forecast_reproduces_degree_m_polynomial(order):
    torch.manual_seed(order)
    coef = torch.randn(order + 1, 3, 5, dtype=torch.float64)
    p = lambda x: sum(c * x**i for i, c in enumerate(coef))  # noqa: E731
    f = Forecaster(order)
    for x in (0, 1, 4, 6, 9):  # uneven gaps between full steps
        f.update(x, p(x))
    assert f.available == order
    for x in (10, 11, 13, 17):
        torch.testing.assert_close(f.predict(x), p(x), rtol=1e-9, atol=1e-9)
    if order >= 1:  # one order less is not enough
        g = Forecaster(order - 1)
        for x in (0, 1, 4, 6, 9):
            g.update(x, p(x))
        assert not torch.allclose(g.predict(13), p(13), rtol=1e-6, atol=1e-6)


def test_taylor_expansion_is_the_reference_form_exact_to_first_order_only():
    p1 = lambda x: 2.0 + 3.0 * torch.tensor([x], dtype=torch.float64)  # noqa: E731
    p2 = lambda x: torch.tensor([x * x], dtype=torch.float64)  # noqa: E731
    f1, f2 = Forecaster(2, "taylor"), Forecaster(2, "taylor")
    for x in (0, 2, 4):
        f1.update(x, p1(x))
        f2.update(x, p2(x))
    torch.testing.assert_close(f1.predict(7), p1(7))
    # TaylorSeer's damped second order: t^2 + (2t - N) k + k^2 = (t + k)^2 - N k
    torch.testing.assert_close(f2.predict(7), p2(7) - 2 * 3)


@torch.no_grad()
def test_rfe_magnitude_is_exact_for_a_linear_module_per_sample():
    """A linear module on inputs moving along a line at an irregular speed: RFE is exact, a Taylor forecast is not.

    Four samples (like two CFG halves of two images) move at different speeds along different lines; each gets its
    own scale and magnitude."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5, dtype=torch.float64)
    v = torch.randn(4, 7, 6, dtype=torch.float64)
    i0 = torch.randn(4, 7, 6, dtype=torch.float64)
    rate = torch.tensor([1.0, 0.3, 2.0, 5.0], dtype=torch.float64)
    speed = lambda x: rate * torch.exp(torch.tensor(0.6 * x, dtype=torch.float64))  # noqa: E731
    inp = lambda x: i0 + speed(x)[:, None, None] * v  # noqa: E731
    for order in (1, 2):
        rfe = RelationalEstimator(Forecaster(order))
        plain = Forecaster(order)
        for x in (0, 1, 3, 6):
            rfe.update(x, inp(x), lin(inp(x)))
            plain.update(x, lin(inp(x)))
        for x in (7, 8, 9):
            truth = lin(inp(x))
            torch.testing.assert_close(rfe.predict(x, inp(x)).double(), truth, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(plain.predict(x), truth, rtol=1e-3, atol=1e-3)
        # the per-sample scale is ||W v|| / ||v||, different for every sample
        expect = torch.stack([torch.linalg.vector_norm(v[b] @ lin.weight.T) / torch.linalg.vector_norm(v[b])
                              for b in range(4)])
        torch.testing.assert_close(rfe.scale.double(), expect)


def test_rfe_falls_back_to_taylor_when_the_input_does_not_move():
    rfe = RelationalEstimator(Forecaster(1))
    const = torch.ones(2, 3, 4)
    rfe.update(0, const, torch.zeros(2, 3, 4))
    rfe.update(1, const, torch.ones(2, 3, 4))
    torch.testing.assert_close(rfe.predict(2, const), 2 * torch.ones(2, 3, 4))


def test_fixed_schedules():
    assert interval_full_steps(10, 1, 3) == [0, 3, 6, 9]
    assert interval_full_steps(10, 2, 3) == [0, 1, 4, 7]
    assert uniform_full_steps(50, 1, 10) == interval_full_steps(50, 1, 5)
    for nfc in (8, 10, 14, 17, 25, 50):
        steps = uniform_full_steps(50, 2, nfc)
        assert len(steps) == nfc and steps[:2] == [0, 1] and steps[-1] < 50
        gaps = {b - a for a, b in zip(steps[1:], steps[2:])}
        assert max(gaps) - min(gaps) <= 1 if gaps else True


# ---- attached to a model ---------------------------------------------------------------------------------------
def test_layout_names_the_cacheable_modules():
    lay = cache_layout(tiny_dit(layers=2))
    assert lay.names == ("transformer_blocks.0.attn1", "transformer_blocks.0.ff", "transformer_blocks.1.attn1",
                         "transformer_blocks.1.ff")
    assert lay.watched == "transformer_blocks.0.attn1"
    with pytest.raises(QcacheError, match="no adapter"):
        cache_layout(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("cfg", [CacheConfig(policy="rfc", tau=0.0), CacheConfig(policy="none"),
                                 CacheConfig(policy="taylorseer", interval=1)])
def test_every_step_full_is_bit_identical_to_the_uncached_model(cfg):
    s = make_sampler()
    ref, _ = run(s, None, n=6)
    out, cache = run(s, cfg, n=6)
    assert torch.equal(out, ref)
    assert cache.stats.nfc_per_generation() == [12, 12]  # batches of 4 and 2


@pytest.mark.parametrize("cfg", [CacheConfig(policy="fora", interval=3), CacheConfig(policy="taylorseer", interval=3),
                                 CacheConfig(policy="rfc", rcs=False, interval=3), CacheConfig(policy="rfc", tau=0.05)])
def test_caching_changes_output_and_state_resets_between_generations(cfg):
    s = make_sampler()
    ref, _ = run(s, None)
    cache = attach_cache(s.transformer, cfg)
    s.hooks.append(cache)
    a = s.sample(4, seed=0, progress=False).images
    s.sample(4, seed=5, progress=False)  # a different generation in between must leave no trace
    c = s.sample(4, seed=0, progress=False).images
    nfc = cache.stats.nfc_per_generation()
    assert torch.equal(a, c)
    assert nfc[0] == nfc[2] < 12
    assert not torch.equal(a, ref) and (a - ref).abs().max() < 0.5
    if cfg.policy != "rfc" or not cfg.rcs:
        assert cache.stats.generations[0].full_steps == interval_full_steps(12, 2, 3)


def test_remove_restores_the_original_forward():
    s = make_sampler()
    ref, _ = run(s, None)
    mods = [s.transformer] + [dict(s.transformer.named_modules())[n] for n in cache_layout(s.transformer).names]
    mods += list(s.transformer.transformer_blocks)  # the lean cached-step path hooks the blocks
    before = [dict(m.__dict__) for m in mods]
    cache = attach_cache(s.transformer, CacheConfig(policy="fora", interval=4))
    s.hooks.append(cache)
    assert "forward" in mods[1].__dict__
    cached = s.sample(4, progress=False).images
    with pytest.raises(QcacheError, match="already attached"):
        attach_cache(s.transformer, CacheConfig(policy="fora"))
    s.hooks.remove(cache)
    cache.remove()
    cache.remove()  # twice is harmless
    for m, b in zip(mods, before):
        assert "forward" not in m.__dict__ and not hasattr(m, "_diffusers_hook")
        assert set(m.__dict__) == set(b)
    assert torch.equal(s.sample(4, progress=False).images, ref)
    assert not torch.equal(cached, ref)


def test_batch_size_and_cfg_halves_are_independent():
    """Per-sample norms: an image's result does not depend on what else is in its batch."""
    cfg = CacheConfig(policy="rfc", rcs=False, interval=3)
    big, _ = run(make_sampler(batch_size=6), cfg, n=6)
    small, _ = run(make_sampler(batch_size=1), cfg, n=6)
    torch.testing.assert_close(big, small, rtol=1e-4, atol=1e-5)


def test_full_step_flag_is_set_after_every_model_call():
    class Seen(SamplerHook):
        def __init__(self):
            self.flags = []

        def after_model(self, st):
            self.flags.append(st.extras["full_step"])

    s = make_sampler()
    cache = attach_cache(s.transformer, CacheConfig(policy="rfc", tau=0.05))
    seen = Seen()
    s.hooks += [cache, seen]
    s.sample(4, progress=False)
    assert seen.flags == cache.stats.generations[0].mask
    assert 2 <= sum(seen.flags) < 12 and seen.flags[:2] == [True, True]


def test_static_schedule_round_trip_and_exact_replay(tmp_path):
    s = make_sampler()
    cfg = CacheConfig(policy="rfc", tau=0.05)
    live, cache = run(s, cfg)
    sched = record_schedule(cache, s, generation=0, tau=0.05)
    path = tmp_path / "sched.json"
    sched.save(path)
    data = json.loads(path.read_text())
    assert data["full_steps"] == cache.stats.generations[0].full_steps and data["nfc"] == len(data["full_steps"])
    assert data["sampler"] == "ddim" and data["steps"] == 12 and data["policy"] == "rfc"
    assert data["params"]["tau"] == 0.05 and data["params"]["order"] == 2
    loaded = StaticSchedule.load(path)
    assert loaded == sched
    outs = []
    for _ in range(2):
        c = replay(s, loaded)
        outs.append(s.sample(4, progress=False).images)
        assert c.stats.nfc_per_generation() == [loaded.nfc]
        s.hooks.remove(c)
        c.remove()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], live)  # same full steps, same forecasts
    with pytest.raises(QcacheError, match="made for ddim with 12 steps"):
        replay(make_sampler(steps=10), loaded)
    path.write_text(json.dumps({**data, "full_steps": [1, 3]}))
    with pytest.raises(QcacheError, match="must contain step 0"):
        StaticSchedule.load(path)


def test_tune_tau_hits_the_target_nfc_and_recipe_path_uses_it():
    s = make_sampler(steps=20)
    cfg = CacheConfig(policy="rfc", target_nfc=8, tune_samples=4)
    res = tune_tau(s, cfg, 8)
    assert abs(res.nfc - 8) <= 0.5 and res.schedule.nfc == round(res.nfc) and res.tau > 0
    assert len(res.probes) >= 2 and s.hooks == []
    taus_nfc = sorted(res.probes)
    assert taus_nfc[0][1] >= taus_nfc[-1][1]  # NFC falls as tau grows
    cache, sched = cache_sampler(s, cfg)
    s.sample(4, seed=cfg.tune_seed, progress=False)
    assert cache.stats.nfc_per_generation() == [8] and sched.full_steps == tuple(cache.stats.generations[0].full_steps)
    with pytest.raises(QcacheError, match="target_nfc"):
        tune_tau(s, cfg, 30)


def test_accounting_memory_and_flops():
    s = make_sampler()
    per_module = 16 * 16 * 4 * 2  # tokens x width x fp32 bytes x CFG halves, per image
    for cfg, tensors in ((CacheConfig(policy="fora", interval=3), 1), (CacheConfig(policy="taylorseer", interval=3), 3)):
        _, cache = run(s, cfg)
        assert cache.stats.bytes_per_image() == 4 * tensors * per_module
    _, cache = run(s, CacheConfig(policy="taylorseer", interval=3, store_dtype="bfloat16"))
    assert cache.stats.bytes_per_image() == 4 * 2 * per_module
    flops, nfc = {}, {}
    for interval in (1, 3):
        cache = attach_cache(s.transformer, CacheConfig(policy="fora", interval=interval))
        s.hooks.append(cache)
        _, flops[interval] = executed_flops(lambda: s.sample(2, progress=False))
        nfc[interval] = cache.stats.nfc_per_generation()[0]
        s.hooks.remove(cache)
        cache.remove()
    assert nfc == {1: 12, 3: 5}
    x = torch.randn(4, 16, 16)  # 2 images x CFG halves, 16 tokens, width 16
    modules = [dict(s.transformer.named_modules())[n] for n in cache_layout(s.transformer).names]
    per_step = sum(executed_flops(lambda m=m: m(x))[1] for m in modules)
    assert per_step > 0 and flops[1] - flops[3] == (12 - 5) * per_step


def test_attach_before_or_after_quantization_gives_the_same_result():
    """The cache wraps attn1/ff, not their Linear layers, so quanto may replace those before or after attaching."""
    quanto = pytest.importorskip("optimum.quanto")

    def quantized(s: Sampler) -> None:
        quanto.quantize(s.transformer, weights=quanto.qint8, activations=None)
        quanto.freeze(s.transformer)

    cfg = CacheConfig(policy="rfc", rcs=False, interval=3)
    s_ref = make_sampler(steps=8)
    quantized(s_ref)
    uncached, _ = run(s_ref, None)
    after, _ = run(s_ref, cfg)
    s = make_sampler(steps=8)
    cache = attach_cache(s.transformer, cfg)
    s.hooks.append(cache)
    quantized(s)
    assert type(s.transformer.transformer_blocks[0].attn1.to_q).__name__ == "QLinear"
    before = s.sample(4, progress=False).images
    assert torch.equal(before, after) and not torch.equal(before, uncached)
    s.hooks.remove(cache)
    cache.remove()
    assert torch.equal(s.sample(4, progress=False).images, uncached)


def test_error_diagnostics_leave_the_result_unchanged():
    s = make_sampler(steps=8)
    cfg = CacheConfig(policy="taylorseer", interval=3)
    plain, _ = run(s, cfg)
    cache = attach_cache(s.transformer, cfg)
    cache.record_errors()
    s.hooks.append(cache)
    diag = s.sample(4, progress=False).images
    assert torch.equal(diag, plain)
    cached = [i for i, f in enumerate(cache.stats.generations[0].mask) if not f]
    assert sorted(cache.errors["transformer_blocks.1.ff"]) == cached
    assert all(0 < e < 1 for e in cache.errors["transformer_blocks.0.attn1"].values())
