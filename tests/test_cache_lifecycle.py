"""The cache's lifecycle: ``with attach_cache(...)`` detaches from the modules and the sampler; one function
decides replay / tune / attach (``resolve_cache``), one decides static / live (``attach_schedule``)."""

from __future__ import annotations

import pytest
import torch

from qcache.cache import StaticSchedule, attach_cache, attach_schedule, cache_sampler, record_schedule, resolve_cache
from qcache.errors import QcacheError
from qcache.recipe import CacheConfig, SamplingConfig
from qcache.sampling import Sampler
from tests.conftest import SCHEDULER_CONFIG, tiny_dit


def sampler(steps: int = 8) -> Sampler:
    return Sampler(tiny_dit(), SCHEDULER_CONFIG, SamplingConfig(steps=steps, batch_size=4))


def hooked(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(m, "_diffusers_hook", None) is not None]


def test_with_block_detaches_from_modules_and_sampler_even_on_error():
    s = sampler()
    ref = s.sample(2, seed=0, progress=False).images
    with pytest.raises(RuntimeError, match="boom"):
        with attach_cache(s.transformer, CacheConfig(policy="fora", interval=2), sampler=s) as cache:
            assert s.hooks == [cache] and hooked(s.transformer)
            raise RuntimeError("boom")
    assert s.hooks == [] and hooked(s.transformer) == [] and not cache.attached
    assert "forward" not in s.transformer.transformer_blocks[0].attn1.__dict__
    assert torch.equal(s.sample(2, seed=0, progress=False).images, ref)  # the model is as it was
    with attach_cache(s.transformer, CacheConfig(policy="fora", interval=2), sampler=s):  # attachable again
        pass


def test_cache_sampler_result_is_a_context_manager():
    s = sampler()
    cache, schedule = cache_sampler(s, CacheConfig(policy="rfc", tau=0.05))
    assert schedule is None and s.hooks == [cache]
    with cache:
        s.sample(2, seed=0, progress=False)
    assert s.hooks == [] and hooked(s.transformer) == []
    assert cache.stats.nfc_per_generation()[0] < 8


def test_resolve_cache_decides_once(tmp_path):
    s = sampler()
    assert resolve_cache(s, CacheConfig()).how == "none"
    given = resolve_cache(s, CacheConfig(policy="rfc", tau=0.05))
    assert (given.how, given.tau, given.live, given.schedule) == ("attach", 0.05, True, None)
    tuned = resolve_cache(s, CacheConfig(policy="rfc", target_nfc=4, tune_samples=2))
    assert tuned.how == "tuned" and tuned.schedule.nfc == 4 and tuned.info()["method"] == tuned.tuned.method
    tuned.schedule.save(tmp_path / "s.json")
    rep = resolve_cache(s, CacheConfig(policy="rfc", schedule=str(tmp_path / "s.json")))
    assert rep.how == "replay" and rep.schedule.full_steps == tuned.schedule.full_steps
    with rep.attach(s) as cache:
        s.sample(2, seed=0, progress=False)
    assert cache.stats.report()["full_steps"] == list(tuned.schedule.full_steps) and not s.hooks


def test_attach_schedule_static_replays_and_live_runs_rcs():
    s = sampler()
    with attach_cache(s.transformer, CacheConfig(policy="rfc", tau=0.05), sampler=s) as cache:
        live = s.sample(2, seed=0, progress=False).images
    sched = record_schedule(cache, s, tau=0.05)
    for mode in ("static", "live"):
        with attach_schedule(s.transformer, sched, mode=mode, sampler=s) as c:
            out = s.sample(2, seed=0, progress=False).images
        assert torch.equal(out, live) and not s.hooks
        assert type(c.policy).__name__ == ("FixedSchedule" if mode == "static" else "RelationalSchedule")
    with pytest.raises(QcacheError, match="mode: must be 'static' or 'live', got 'fast'"):
        attach_schedule(s.transformer, sched, mode="fast")
    assert attach_schedule(s.transformer, None) is None
    none = StaticSchedule("ddim", 8, (0, 1), "none")
    assert attach_schedule(s.transformer, none) is None
    other = Sampler(s.transformer, SCHEDULER_CONFIG, SamplingConfig(steps=6))
    with pytest.raises(QcacheError, match="cache.schedule: made for ddim with 8 steps"):
        attach_schedule(s.transformer, sched, sampler=other)
    assert hooked(s.transformer) == []
