"""Attaching a cache as a recipe or a saved schedule says: the one place for each decision.

- ``resolve_cache``: replay ``cache.schedule``, tune tau to ``target_nfc`` (an exact-NFC schedule), or attach the
  config as given; ``CacheSetup.attach`` then attaches it to a sampler.
- ``attach_schedule``: a saved schedule (a compressed model's) static (replayed) or live (RCS with its tau).

Every cache returned is a context manager that detaches from the modules and the sampler on exit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QcacheError
from ..recipe import CacheConfig
from ..sampling import Sampler
from .hooks import FeatureCache, attach_cache
from .schedule import StaticSchedule
from .tuning import TuneResult, exact_nfc_schedule


def replay(sampler: Sampler, schedule: StaticSchedule, base: CacheConfig | None = None) -> FeatureCache:
    """Attach a cache that replays ``schedule`` on ``sampler`` (and add it to ``sampler.hooks``)."""
    schedule.check(sampler)
    return attach_cache(sampler.transformer, schedule.config(base), full_steps=list(schedule.full_steps),
                        sampler=sampler)


@dataclass
class CacheSetup:
    """How a recipe's cache section runs on a sampler, decided once by ``resolve_cache``.

    ``how``: ``none`` (no cache), ``replay`` (a saved schedule), ``tuned`` (tau tuned to target_nfc; ``schedule``
    has exactly target_nfc full steps, ``tuned.method`` says how it was found) or ``attach`` (the config as given:
    fixed schedule, or RCS with the recipe's tau)."""

    how: str
    cfg: CacheConfig
    schedule: StaticSchedule | None = None
    tau: float | None = None
    tuned: TuneResult | None = None

    @property
    def live(self) -> bool:
        """Whether the cache decides its full steps while sampling (RCS with a tau) rather than from a schedule."""
        return self.how == "attach" or (self.how == "tuned" and self.tuned.method == "tau")

    def info(self) -> dict:
        """What the report records about this setup."""
        if self.how == "none":
            return {"policy": "none"}
        if self.how == "replay":
            return {"policy": self.schedule.policy, "source": self.cfg.schedule, "tau": self.schedule.params.get("tau")}
        if self.how == "tuned":
            t = self.tuned
            return {"policy": self.cfg.policy, "tau": t.tau, "tune_nfc": t.nfc, "method": t.method,
                    "probes": [list(p) for p in t.probes]}
        return {"policy": self.cfg.policy, "tau": self.cfg.tau}

    def attach(self, sampler: Sampler) -> FeatureCache | None:
        """Attach the cache this setup describes to ``sampler`` (in its hooks; ``remove()`` / ``with`` detach).

        A tuned tau that hits the target exactly runs live, as RCS; a schedule chosen on the error trace replays.
        Policy ``none`` attaches a cache that runs every step (its stats still count NFC)."""
        if self.how == "replay" or (self.how == "tuned" and not self.live):
            return replay(sampler, self.schedule, self.cfg)
        return attach_cache(sampler.transformer, self.cfg, tau=self.tau, sampler=sampler)


def resolve_cache(sampler: Sampler, cfg: CacheConfig, tau_guess: float | None = None) -> CacheSetup:
    """The one place that decides how a cache section runs: replay ``cfg.schedule``, tune tau to ``target_nfc``
    (RFC with RCS and no tau: an exact-NFC schedule, ``exact_nfc_schedule``), or attach as given.

    ``tau_guess`` starts the tau search (e.g. the full-precision model's tau when tuning the quantized one)."""
    if cfg.policy == "none":
        return CacheSetup("none", cfg)
    if cfg.schedule is not None:
        schedule = StaticSchedule.load(cfg.schedule)
        schedule.check(sampler)
        return CacheSetup("replay", cfg, schedule, schedule.params.get("tau"))
    if cfg.policy == "rfc" and cfg.rcs and cfg.tau is None:
        tuned = exact_nfc_schedule(sampler, cfg, cfg.target_nfc, start=tau_guess)
        return CacheSetup("tuned", cfg, tuned.schedule, tuned.tau, tuned)
    return CacheSetup("attach", cfg, None, cfg.tau)


def attach_schedule(transformer: torch.nn.Module, schedule: StaticSchedule | None, base: CacheConfig | None = None,
                    mode: str = "static", sampler: Sampler | None = None) -> FeatureCache | None:
    """The one place that decides static against live for a saved schedule (a compressed model's).

    ``static`` replays the schedule's full steps; ``live`` runs its policy with its tuned tau (RCS decides while
    sampling). None for a schedule without a cache. ``sampler``: check the schedule against it and add the cache
    to its hooks."""
    if mode not in ("static", "live"):
        raise QcacheError(f"mode: must be 'static' or 'live', got {mode!r}")
    if schedule is None or schedule.policy == "none":
        return None
    if sampler is not None:
        schedule.check(sampler)
    cfg = schedule.config(base)
    if mode == "static":
        return attach_cache(transformer, cfg, full_steps=list(schedule.full_steps), sampler=sampler)
    return attach_cache(transformer, cfg, tau=cfg.tau, sampler=sampler)


def cache_sampler(sampler: Sampler, cfg: CacheConfig) -> tuple[FeatureCache, StaticSchedule | None]:
    """Set up the recipe's ``cache`` section on ``sampler`` (``resolve_cache``: replay, tune tau to target_nfc, or
    attach as given).

    Returns the attached cache (already in ``sampler.hooks``; ``remove()`` or ``with cache:`` takes it off) and,
    when tau was tuned, the schedule it produced.
    """
    setup = resolve_cache(sampler, cfg)
    return setup.attach(sampler), (setup.schedule if setup.how == "tuned" else None)
