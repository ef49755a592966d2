"""Feature caching for diffusers DiTs: FORA, TaylorSeer and RFC (RFE + RCS), with exact-NFC static schedules.

Where each idea lives:

==============================================  ==============================================================
idea                                            file
==============================================  ==============================================================
the cached-step formulas (differences, RFE       ``formulas.py`` (pure functions, one definition each;
coefficient, forecast, input distance)           ``fused.py`` compiles the same functions, ``cache.compile``)
FORA: reuse the last output (arXiv 2407.01425)   ``forecast.py`` (``ModuleState`` mode ``reuse``)
TaylorSeer: forecast from finite differences     ``forecast.py`` (``Forecaster``; mode ``forecast``;
(arXiv 2503.06923)                               ``cache.expansion``: ``newton`` | ``taylor``)
RFE of RFC (arXiv 2602.19506): magnitude from    ``forecast.py`` (``RelationalEstimator``; mode ``rfe``)
the input's change
RCS of RFC: full step when the watched input's   ``schedule.py`` (``RelationalSchedule``, beside the fixed
forecast error adds up to tau                    step policies and the static schedules)
tau tuning to a target NFC, exact-NFC schedules  ``tuning.py`` (``tune_tau``, ``exact_nfc_schedule``);
                                                 ``schedule.trace_full_steps`` (choice on the error trace)
static schedules (saved full-step masks)         ``schedule.py`` (``StaticSchedule``)
the cache on a model: hooks, lifecycle           ``hooks.py`` (``FeatureCache``, ``attach_cache``)
the lean cached step of DiT/PixArt blocks        ``fast_path.py`` (``LeanPath``, owned by the cache)
replay / tune / attach; static / live            ``attach.py`` (``resolve_cache``, ``attach_schedule``)
which modules are cached (per model family)      ``adapters.py`` -> ``qcache.families``
NFC, memory, FLOPs accounting                    ``accounting.py``
==============================================  ==============================================================

Typical use::

    with attach_cache(transformer, cfg, tau=0.3, sampler=sampler) as cache:   # detaches on exit
        images = sampler.sample(n)
    cache.stats.report()                           # NFC, full steps, cache bytes per image

    cache, schedule = cache_sampler(sampler, recipe.cache)   # as a recipe says: replay / tune tau / attach
    with cache:
        images = sampler.sample(n)
"""

from . import formulas
from .accounting import CacheStats, executed_flops
from .adapters import CacheLayout, cache_layout
from .attach import CacheSetup, attach_schedule, cache_sampler, replay, resolve_cache
from .forecast import Forecaster, ModuleState, RelationalEstimator
from .hooks import FeatureCache, attach_cache, make_policy
from .schedule import (
                       AllSteps,
                       FixedSchedule,
                       RelationalSchedule,
                       StaticSchedule,
                       StepPolicy,
                       interval_full_steps,
                       record_schedule,
                       trace_full_steps,
                       uniform_full_steps,
)
from .tuning import TuneResult, exact_nfc_schedule, tune_tau, watched_trace

__all__ = [
    "AllSteps", "CacheLayout", "CacheSetup", "CacheStats", "FeatureCache", "FixedSchedule", "Forecaster",
    "ModuleState", "RelationalEstimator", "RelationalSchedule", "StaticSchedule", "StepPolicy", "TuneResult",
    "attach_cache", "attach_schedule", "cache_layout", "cache_sampler", "exact_nfc_schedule", "executed_flops",
    "formulas", "interval_full_steps", "make_policy", "record_schedule", "replay", "resolve_cache", "trace_full_steps",
    "tune_tau", "uniform_full_steps", "watched_trace",
]
