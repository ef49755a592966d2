"""Tuning RCS's tau to a target NFC on a calibration batch, and exact-NFC schedules that never fail.

``tune_tau`` bisects tau until RCS's NFC is within a tolerance of the target. RCS's NFC can jump by more than one
as tau moves, so ``exact_nfc_schedule`` falls back to choosing exactly the target count of full steps on the
watched input's error trace (``schedule.trace_full_steps``) and records which method gave the schedule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..errors import QcacheError
from ..recipe import CacheConfig
from ..sampling import Sampler
from .hooks import attach_cache
from .schedule import StaticSchedule, longest_gap, max_gap, record_schedule, schedule_params, trace_full_steps


@dataclass
class TuneResult:
    """Tau found by bisection, the mean NFC it gave on the calibration batch, its schedule, and every probe.

    ``method``: ``tau`` when the schedule is the one a probed tau gave, ``trace`` when it was chosen on the RCS
    error trace because no probed tau gave exactly the target (``exact_nfc_schedule``)."""

    tau: float
    nfc: float
    schedule: StaticSchedule
    probes: list[tuple[float, float]]
    method: str = "tau"


def _search_tau(sampler: Sampler, cfg: CacheConfig, target_nfc: float, n: int | None, seed: int | None,
                tol: float, max_iter: int, start: float | None) -> tuple[TuneResult, bool]:
    """The tau search of ``tune_tau``: (closest probe, whether it is within ``tol`` of the target)."""
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
        with attach_cache(sampler.transformer, cfg, tau=tau) as cache, sampler.extra_hooks(cache):
            sampler.sample(n, seed=seed, progress=False)
        nfc = cache.stats.mean_nfc()
        probes.append((tau, nfc, record_schedule(cache, sampler, tau=tau)))
        return nfc

    def result(hit: bool) -> tuple[TuneResult, bool]:
        tau, nfc, sched = min(probes, key=lambda p: (abs(p[1] - target_nfc), -p[0]))
        return TuneResult(tau, nfc, sched, [(p[0], p[1]) for p in probes]), hit

    guided = start is not None and start > 0
    lo, hi, grow = 0.0, (start if guided else 1e-3), (2.0 if guided else 4.0)
    nfc = probe(hi)
    if abs(nfc - target_nfc) <= tol:
        return result(True)
    if guided and nfc < target_nfc:  # too few full steps at the guess: halve tau until NFC is above the target
        for _ in range(max_iter):
            nfc = probe(hi / 2)
            if abs(nfc - target_nfc) <= tol:
                return result(True)
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
                return result(True)
    for _ in range(max_iter):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 4
        nfc = probe(mid)
        if abs(nfc - target_nfc) <= tol:
            return result(True)
        if nfc > target_nfc:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-7 * hi:
            break
    return result(False)


def tune_tau(sampler: Sampler, cfg: CacheConfig, target_nfc: float, n: int | None = None, seed: int | None = None,
             tol: float = 0.5, max_iter: int = 40, start: float | None = None) -> TuneResult:
    """Find tau so that RCS's mean NFC on a calibration batch is within ``tol`` of ``target_nfc``.

    NFC falls as tau grows (tau = 0: every step full), so: double tau until NFC <= target, then bisect (in log
    space) between the last tau above and the first below. The calibration batch is ``n`` images of noise ``seed``
    (default ``cfg.tune_samples`` and ``cfg.tune_seed``); other hooks of the sampler stay active. ``start`` is a
    first guess (e.g. the tau tuned on the full-precision model before quantizing it): the search then doubles or
    halves from there, which usually needs far fewer probes. Raises QcacheError when no tau comes within ``tol``;
    the closest probe is in the message. ``exact_nfc_schedule`` never fails.
    """
    best, hit = _search_tau(sampler, cfg, target_nfc, n, seed, tol, max_iter, start)
    if not hit:
        raise QcacheError(f"cache.target_nfc: no tau gives NFC {target_nfc} +/- {tol} on the calibration batch "
                          f"(closest: tau={best.tau:.4g} with NFC {best.nfc:.2f})")
    return best


def exact_nfc_schedule(sampler: Sampler, cfg: CacheConfig, target_nfc: int, n: int | None = None,
                       seed: int | None = None, start: float | None = None, max_iter: int = 40) -> TuneResult:
    """A static schedule with exactly ``target_nfc`` full steps (any count from warmup to steps); never fails.

    First tau is tuned as ``tune_tau`` does; when a probed tau gives exactly ``target_nfc`` full steps on the
    calibration batch, with no gap longer than ``schedule.max_gap``, its schedule is used (``method: tau``).
    Otherwise (RCS's NFC jumps past the target as tau moves, or its few full steps leave a long blind stretch) the
    full steps are chosen on the error trace of the calibration batch instead (``method: trace``,
    ``trace_full_steps``): exactly that many, keeping RCS's accumulated input error lowest within the gap bound.
    The method is recorded in the schedule's params.
    """
    best, _ = _search_tau(sampler, cfg, target_nfc, n, seed, 0.5, max_iter, start)
    steps = sampler.config.steps
    bound = max_gap(steps, target_nfc, cfg.warmup)
    if best.schedule.nfc == target_nfc and best.nfc == target_nfc and longest_gap(best.schedule.full_steps,
                                                                                  steps) <= bound:
        return dataclasses.replace(best, schedule=_with_params(best.schedule, method="tau"))
    trace = watched_trace(sampler, cfg, n, seed)
    full = trace_full_steps(trace, target_nfc, cfg.warmup)
    sched = StaticSchedule(sampler.config.scheduler, sampler.config.steps, tuple(full), cfg.policy,
                           {**schedule_params(cfg, best.tau), "method": "trace"})
    return TuneResult(best.tau, float(len(full)), sched, best.probes, method="trace")


def _with_params(schedule: StaticSchedule, **params) -> StaticSchedule:
    return dataclasses.replace(schedule, params={**schedule.params, **params})


TRACE_IMAGES = 8  # images of the calibration batch whose watched inputs the error trace keeps


def watched_trace(sampler: Sampler, cfg: CacheConfig, n: int | None = None, seed: int | None = None
                  ) -> list[torch.Tensor]:
    """The watched module's input at every step (all steps full) of the calibration batch's first
    ``TRACE_IMAGES`` images (both CFG halves), as float32 tensors (images, numel)."""
    from .adapters import cache_layout

    n = min(cfg.tune_samples if n is None else n, TRACE_IMAGES)
    seed = cfg.tune_seed if seed is None else seed
    layout = cache_layout(sampler.transformer)
    module = dict(sampler.transformer.named_modules())[layout.watched]
    io = layout.io_of(layout.watched)
    trace: list[torch.Tensor] = []

    def grab(mod, args, kwargs):
        trace.append(io.input(args, kwargs).detach().float().reshape(io.input(args, kwargs).shape[0], -1).cpu())

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        sampler.sample(n, seed=seed, progress=False)
    finally:
        handle.remove()
    return trace
