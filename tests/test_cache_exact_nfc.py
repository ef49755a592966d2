"""Exact-NFC schedules: any target between warmup and steps gives a schedule with exactly that many full steps,
from a tau when one hits it, else chosen on RCS's error trace; the method is recorded."""

from __future__ import annotations

import math

import pytest
import torch

from qcache.cache import StaticSchedule, exact_nfc_schedule, resolve_cache, trace_full_steps
from qcache.recipe import CacheConfig, SamplingConfig
from qcache.sampling import Sampler
from tests.conftest import SCHEDULER_CONFIG, tiny_dit


def trace(n: int = 20, kink: int = 14) -> list[torch.Tensor]:
    """A watched input that moves slowly and linearly until ``kink``, then fast and curved."""
    torch.manual_seed(0)
    base, d1, d2 = torch.randn(3, 1, 64)
    out = []
    for t in range(n):
        x = base + 0.01 * t * d1 + (0.05 * (t - kink) ** 2 * d2 if t > kink else 0)
        out.append(x.expand(2, -1).clone())
    return out


@pytest.mark.parametrize("nfc", [2, 3, 5, 8, 13, 19, 20])
def test_trace_schedule_has_exactly_the_count_and_the_warmup(nfc):
    full = trace_full_steps(trace(), nfc, warmup=2)
    assert len(full) == nfc and full[:2] == [0, 1] and full == sorted(set(full))
    assert all(0 <= i < 20 for i in full)


def test_trace_schedule_spends_its_steps_where_the_input_moves():
    # without a gap bound the curved part gets the full steps; the linear part forecasts
    full = trace_full_steps(trace(kink=12), 7, warmup=1, gap=20)
    assert sum(i > 12 for i in full) >= 4
    # with the default bound (no gap over 1.25x the even spacing: 4 here) steps 0..12 need 0, 4, 8, 12 at most
    # apart, and every remaining step still goes to the curved part
    full = trace_full_steps(trace(kink=12), 7, warmup=1)
    assert max(b - a for a, b in zip(full, full[1:])) <= 4 and sum(i > 12 for i in full) == 3


def test_trace_schedule_spreads_evenly_where_the_input_curves_evenly():
    """Uniform curvature: every gap costs alike, so no long blind stretch (RCS's NFC-8 pattern of docs/cache.md)."""
    torch.manual_seed(0)
    a, b = torch.randn(2, 1, 64)
    tr = [(a * math.cos(0.1 * t) + b * math.sin(0.1 * t)).expand(2, -1).clone() for t in range(50)]  # a circle
    full = trace_full_steps(tr, 8, warmup=2)
    gaps = [y - x for x, y in zip(full[1:], full[2:])]
    assert len(full) == 8 and max(gaps) - min(gaps) <= 3 and max(gaps) <= 9, full


def tiny_sampler(steps: int = 12) -> Sampler:
    return Sampler(tiny_dit(layers=2), SCHEDULER_CONFIG, SamplingConfig(steps=steps, batch_size=4))


@pytest.mark.parametrize("target", [2, 3, 5, 7, 9, 12])
def test_every_target_gets_exactly_its_nfc(target):
    s = tiny_sampler()
    cfg = CacheConfig(policy="rfc", warmup=2, target_nfc=target, tune_samples=2)
    res = exact_nfc_schedule(s, cfg, target, max_iter=6)
    assert res.schedule.nfc == target and len(res.schedule.full_steps) == target
    assert res.method in ("tau", "trace") and res.schedule.params["method"] == res.method
    assert StaticSchedule.from_dict(res.schedule.to_dict()).full_steps == res.schedule.full_steps
    assert not s.hooks  # the probes detached


def test_a_missed_target_falls_back_to_the_trace_and_is_reported(monkeypatch):
    """Force the tau search to miss (every probe gives one full step too many): the schedule comes from the trace."""
    from qcache.cache import tuning

    real = tuning._search_tau

    def missing(*a, **k):
        best, _ = real(*a, **k)
        sched = best.schedule
        wrong = StaticSchedule(sched.sampler, sched.steps, tuple(range(a[2] + 1)), sched.policy, sched.params)
        return tuning.TuneResult(best.tau, float(a[2] + 1), wrong, best.probes), False

    monkeypatch.setattr(tuning, "_search_tau", missing)
    s = tiny_sampler()
    cfg = CacheConfig(policy="rfc", warmup=2, target_nfc=5, tune_samples=2)
    setup = resolve_cache(s, cfg)
    assert setup.how == "tuned" and setup.tuned.method == "trace" and not setup.live
    assert setup.schedule.nfc == 5 and setup.schedule.params["method"] == "trace"
    assert setup.info()["method"] == "trace"
    with setup.attach(s) as cache:  # a trace schedule replays
        s.sample(2, seed=0, progress=False)
    assert cache.stats.nfc_per_generation() == [5] and not s.hooks


@pytest.mark.slow
def test_digits_model_gets_exact_nfc_for_targets_from_3_to_49():
    from qcache.models import load_model
    from qcache.recipe import load_recipe

    r = load_recipe("recipes/digits.yaml")
    m = load_model(r.model)
    s = Sampler(m.transformer, m.scheduler_config, r.sampling)
    for target in (3, 8, 22, 37, 49):
        cfg = CacheConfig(policy="rfc", order=2, warmup=2, target_nfc=target, tune_samples=4)
        res = exact_nfc_schedule(s, cfg, target, max_iter=8)
        assert res.schedule.nfc == target, (target, res.method, res.probes)
