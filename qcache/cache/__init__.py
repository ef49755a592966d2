"""Feature caching for diffusers DiTs: FORA, TaylorSeer and RFC (RFE + RCS), with target-NFC static schedules.

Typical use::

    cache, schedule = cache_sampler(sampler, recipe.cache)   # attach (tuning tau if target_nfc is set)
    images = sampler.sample(n)
    cache.stats.report()                                     # NFC, full steps, cache bytes per image
    cache.remove()                                           # original forwards back

or, by hand: ``cache = attach_cache(transformer, cfg, tau=0.3); sampler.hooks.append(cache)``.
"""

from .accounting import CacheStats, executed_flops
from .adapters import CacheLayout, cache_layout
from .forecast import Forecaster, RelationalEstimator
from .hooks import FeatureCache, attach_cache, make_policy
from .policies import AllSteps, FixedSchedule, RelationalSchedule, StepPolicy, interval_full_steps, uniform_full_steps
from .schedule import StaticSchedule, TuneResult, cache_sampler, record_schedule, replay, tune_tau

__all__ = [
    "AllSteps", "CacheLayout", "CacheStats", "FeatureCache", "FixedSchedule", "Forecaster", "RelationalEstimator",
    "RelationalSchedule", "StaticSchedule", "StepPolicy", "TuneResult", "attach_cache", "cache_layout",
    "cache_sampler", "executed_flops", "interval_full_steps", "make_policy", "record_schedule", "replay",
    "tune_tau", "uniform_full_steps",
]
