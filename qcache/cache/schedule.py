"""Static schedules (a fixed full-step mask saved as JSON and replayed) and tuning tau to a target NFC.

A static schedule records which steps were full for one sampler setting, with the policy and parameters that made
it. Replaying it runs the same forecast on exactly those steps: deterministic, with an exact NFC, and the same on
every device of a parallel job.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cli import write_json
from ..errors import QcacheError
from ..recipe import CacheConfig
from ..sampling import Sampler
from .hooks import FeatureCache, attach_cache

SCHEDULE_FORMAT = "qcache.cache_schedule"
SCHEDULE_VERSION = 1
PARAM_KEYS = ("policy", "interval", "order", "warmup", "tau", "target_nfc", "rfe", "rcs", "expansion", "store_dtype")


@dataclass(frozen=True)
class StaticSchedule:
    """A fixed full-step mask for (sampler, steps), with the cache policy and parameters it replays."""

    sampler: str
    steps: int
    full_steps: tuple[int, ...]
    policy: str
    params: dict = field(default_factory=dict)

    @property
    def nfc(self) -> int:
        return len(self.full_steps)

    def to_dict(self) -> dict:
        return {"format": SCHEDULE_FORMAT, "version": SCHEDULE_VERSION, "sampler": self.sampler, "steps": self.steps,
                "nfc": self.nfc, "full_steps": list(self.full_steps), "policy": self.policy, "params": self.params}

    @classmethod
    def from_dict(cls, d: dict, where: str = "schedule") -> "StaticSchedule":
        """Validate a schedule read from JSON: format, sampler, steps, full steps (integers, not booleans, in
        [0, steps), unique, sorted, step 0 included), nfc, policy and every parameter's type and range."""
        from ..cli import short, short_str
        from ..recipe import RecipeError, _check_value
        from ..sampling import SCHEDULERS

        def bad(msg: str) -> QcacheError:
            return QcacheError(f"{where}: {msg}")

        if not isinstance(d, dict) or d.get("format") != SCHEDULE_FORMAT:
            raise bad(f"not a qcache cache schedule (format must be {SCHEDULE_FORMAT!r})")
        if d.get("version") != SCHEDULE_VERSION:
            raise bad(f"unsupported schedule version {short(d.get('version'))} (this qcache reads {SCHEDULE_VERSION})")
        sampler, steps, full = d.get("sampler"), d.get("steps"), d.get("full_steps")
        if sampler not in SCHEDULERS:
            raise bad(f"sampler: must be one of {', '.join(map(repr, SCHEDULERS))}, got {short(sampler)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise bad(f"steps: must be an integer in [1, 1000], got {short(steps)}")
        if not isinstance(full, list) or not all(type(i) is int and 0 <= i < steps for i in full):
            raise bad(f"full_steps: must be a list of integer step indices in [0, {steps}), got {short(full)}")
        if any(b <= a for a, b in zip(full, full[1:])):
            raise bad(f"full_steps: must be sorted and unique, got {short(full)}")
        if 0 not in full:
            raise bad("full_steps: must contain step 0 (nothing is cached before the first full step)")
        if "nfc" in d and (type(d["nfc"]) is not int or d["nfc"] != len(full)):
            raise bad(f"nfc: {short(d['nfc'])} does not match the {len(full)} full steps listed")
        policy = d.get("policy")
        if policy not in ("none", "fora", "taylorseer", "rfc"):
            raise bad(f"policy: must be none, fora, taylorseer or rfc, got {short(policy)}")
        params = d.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise bad(f"params: must be a mapping, got {short(params)}")
        hints = typing.get_type_hints(CacheConfig)
        fields = {f.name: f for f in dataclasses.fields(CacheConfig)}
        for k, v in params.items():
            if k not in PARAM_KEYS or k == "policy":
                raise bad(f"params.{short_str(k, 80)}: unknown parameter (known: {', '.join(PARAM_KEYS[1:])})")
            try:
                _check_value(k, hints[k], v, dict(fields[k].metadata))
            except RecipeError as e:
                raise bad(f"params.{e}") from None
        return cls(sampler, steps, tuple(full), policy, dict(params))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "StaticSchedule":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise QcacheError(f"cache.schedule: file not found: {p}") from None
        except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON and UTF-8 decoding errors
            raise QcacheError(f"cache.schedule: cannot read {p}: {str(e)[:200]}") from None
        return cls.from_dict(data, where=f"cache.schedule ({p})")

    def config(self, base: CacheConfig | None = None) -> CacheConfig:
        """The cache config this schedule replays (its policy and forecast parameters)."""
        known = {k: v for k, v in self.params.items() if k in PARAM_KEYS and k != "policy"}
        base = base or CacheConfig()
        return dataclasses.replace(base, policy=self.policy, schedule=None, **known)

    def check(self, sampler: Sampler) -> None:
        """Refuse to replay on a sampler with another scheduler or step count."""
        if sampler.config.scheduler != self.sampler or sampler.config.steps != self.steps:
            raise QcacheError(f"cache.schedule: made for {self.sampler} with {self.steps} steps, but the sampler "
                              f"runs {sampler.config.scheduler} with {sampler.config.steps} steps")


def schedule_params(cfg: CacheConfig, tau: float | None = None) -> dict:
    d = {k: getattr(cfg, k) for k in PARAM_KEYS if k != "policy"}
    if tau is not None:
        d["tau"] = tau
    return d


def replay(sampler: Sampler, schedule: StaticSchedule, base: CacheConfig | None = None) -> FeatureCache:
    """Attach a cache that replays ``schedule`` on ``sampler`` (and append it to ``sampler.hooks``)."""
    schedule.check(sampler)
    cache = attach_cache(sampler.transformer, schedule.config(base), full_steps=list(schedule.full_steps))
    sampler.hooks.append(cache)
    return cache


def record_schedule(cache: FeatureCache, sampler: Sampler, generation: int = -1,
                    tau: float | None = None) -> StaticSchedule:
    """The full-step mask of one generation the cache served, as a static schedule."""
    gens = cache.stats._done()
    if not gens:
        raise QcacheError("cache: no generation recorded yet")
    g = gens[generation]
    return StaticSchedule(sampler.config.scheduler, len(g.mask), tuple(g.full_steps), cache.cfg.policy,
                          schedule_params(cache.cfg, tau))


@dataclass
class TuneResult:
    """Tau found by bisection, the mean NFC it gave on the calibration batch, its schedule, and every probe."""

    tau: float
    nfc: float
    schedule: StaticSchedule
    probes: list[tuple[float, float]]


def tune_tau(sampler: Sampler, cfg: CacheConfig, target_nfc: float, n: int | None = None, seed: int | None = None,
             tol: float = 0.5, max_iter: int = 40, start: float | None = None) -> TuneResult:
    """Find tau so that RCS's mean NFC on a calibration batch is within ``tol`` of ``target_nfc``.

    NFC falls as tau grows (tau = 0: every step full), so: double tau until NFC <= target, then bisect (in log
    space) between the last tau above and the first below. The calibration batch is ``n`` images of noise ``seed``
    (default ``cfg.tune_samples`` and ``cfg.tune_seed``); other hooks of the sampler stay active. ``start`` is a
    first guess (e.g. the tau tuned on the full-precision model before quantizing it): the search then doubles or
    halves from there, which usually needs far fewer probes. Raises QcacheError when no tau comes within ``tol``;
    the closest probe is in the message.
    """
    steps = sampler.config.steps
    if not cfg.warmup <= target_nfc <= steps:
        raise QcacheError(f"cache.target_nfc: must be between warmup ({cfg.warmup}) and steps ({steps}), "
                          f"got {target_nfc}")
    if not (cfg.policy == "rfc" and cfg.rcs):
        raise QcacheError("cache.target_nfc: tau tuning needs policy rfc with rcs: true")
    n = cfg.tune_samples if n is None else n
    seed = cfg.tune_seed if seed is None else seed
    probes: list[tuple[float, float, StaticSchedule]] = []

    def probe(tau: float) -> float:
        cache = attach_cache(sampler.transformer, cfg, tau=tau)
        try:
            with sampler.extra_hooks(cache):
                sampler.sample(n, seed=seed, progress=False)
        finally:
            cache.remove()
        nfc = cache.stats.mean_nfc()
        probes.append((tau, nfc, record_schedule(cache, sampler, tau=tau)))
        return nfc

    def result() -> TuneResult:
        tau, nfc, sched = min(probes, key=lambda p: (abs(p[1] - target_nfc), -p[0]))
        return TuneResult(tau, nfc, sched, [(p[0], p[1]) for p in probes])

    guided = start is not None and start > 0
    lo, hi, grow = 0.0, (start if guided else 1e-3), (2.0 if guided else 4.0)
    nfc = probe(hi)
    if abs(nfc - target_nfc) <= tol:
        return result()
    if guided and nfc < target_nfc:  # too few full steps at the guess: halve tau until NFC is above the target
        for _ in range(max_iter):
            nfc = probe(hi / 2)
            if abs(nfc - target_nfc) <= tol:
                return result()
            if nfc > target_nfc:
                lo = hi / 2
                break
            hi = hi / 2
    else:  # too many: grow tau until NFC is below the target
        for _ in range(max_iter):
            if nfc < target_nfc:
                break
            lo, hi = hi, hi * grow
            nfc = probe(hi)
            if abs(nfc - target_nfc) <= tol:
                return result()
    for _ in range(max_iter):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 4
        nfc = probe(mid)
        if abs(nfc - target_nfc) <= tol:
            return result()
        if nfc > target_nfc:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-7 * hi:
            break
    best = result()
    raise QcacheError(f"cache.target_nfc: no tau gives NFC {target_nfc} +/- {tol} on the calibration batch "
                      f"(closest: tau={best.tau:.4g} with NFC {best.nfc:.2f})")


def cache_sampler(sampler: Sampler, cfg: CacheConfig) -> tuple[FeatureCache, StaticSchedule | None]:
    """Set up the recipe's ``cache`` section on ``sampler``: replay, tune tau to target_nfc, or attach as given.

    Returns the attached cache (already in ``sampler.hooks``) and, when tau was tuned, the schedule it produced.
    """
    if cfg.schedule is not None:
        return replay(sampler, StaticSchedule.load(cfg.schedule), cfg), None
    tuned = None
    tau = cfg.tau
    if cfg.policy == "rfc" and cfg.rcs and tau is None:
        tuned = tune_tau(sampler, cfg, cfg.target_nfc)
        tau = tuned.tau
    cache = attach_cache(sampler.transformer, cfg, tau=tau)
    sampler.hooks.append(cache)
    return cache, (tuned.schedule if tuned else None)
