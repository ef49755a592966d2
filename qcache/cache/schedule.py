"""Which denoising steps are full steps: step policies, RCS, static schedules, and exact-count schedules.

- ``FixedSchedule``: every ``interval`` steps, or ``nfc`` evenly spread full steps (FORA, TaylorSeer, RFE-only);
- ``RelationalSchedule``: RCS of RFC (arXiv 2602.19506): a full step once the summed relative L1 error of the
  watched input's forecast since the last full step exceeds tau;
- ``StaticSchedule``: a fixed full-step mask saved as JSON and replayed (deterministic, exact NFC, the same on
  every device of a parallel job), with the policy and parameters that made it;
- ``trace_full_steps``: exactly k full steps chosen on RCS's error trace (when no tau gives k; tuning.py).

Tau tuning and the exact-NFC search are in tuning.py; attaching a cache as a recipe or a schedule says, in attach.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..cli import write_json
from ..errors import QcacheError
from ..recipe import CacheConfig
from ..sampling import Sampler
from .forecast import Forecaster
from .formulas import relative_l1

if TYPE_CHECKING:
    from .hooks import FeatureCache

SCHEDULE_FORMAT = "qcache.cache_schedule"
SCHEDULE_VERSION = 1
SCHEDULE_METHODS = ("tau", "trace")  # a probed tau's own schedule, or full steps chosen on RCS's error trace
PARAM_KEYS = ("policy", "interval", "order", "warmup", "tau", "target_nfc", "rfe", "rcs", "expansion", "store_dtype",
              "granularity", "fresh_head", "fresh_tail")


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
    def from_dict(cls, d: dict, where: str = "schedule") -> StaticSchedule:
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
            if k == "method":  # how the full steps were chosen (tuning.py): not a cache parameter
                if v not in SCHEDULE_METHODS:
                    raise bad(f"params.method: must be one of {', '.join(SCHEDULE_METHODS)}, got {short(v)}")
                continue
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
    def load(cls, path: str | Path) -> StaticSchedule:
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


def record_schedule(cache: FeatureCache, sampler: Sampler, generation: int = -1,
                    tau: float | None = None) -> StaticSchedule:
    """The full-step mask of one generation the cache served, as a static schedule."""
    gens = cache.stats._done()
    if not gens:
        raise QcacheError("cache: no generation recorded yet")
    g = gens[generation]
    return StaticSchedule(sampler.config.scheduler, len(g.mask), tuple(g.full_steps), cache.cfg.policy,
                          schedule_params(cache.cfg, tau))


# ---- step policies ---------------------------------------------------------------------------------------------
def interval_full_steps(steps: int, warmup: int, interval: int) -> list[int]:
    """Full steps of a fixed interval: the first ``warmup`` steps, then every ``interval`` steps after the last."""
    anchor = max(warmup, 1) - 1
    return [i for i in range(steps) if i <= anchor or (i - anchor) % interval == 0]


def uniform_full_steps(steps: int, warmup: int, nfc: int) -> list[int]:
    """Exactly ``nfc`` full steps: the warm-up, then the rest spread evenly over the remaining steps.

    Generalises ``interval_full_steps`` to an NFC that no integer interval gives (gaps differ by at most one).
    """
    warm = min(max(warmup, 1), steps)
    nfc = max(min(nfc, steps), warm)
    rest = nfc - warm
    anchor = warm - 1
    gap = (steps - anchor) / (rest + 1)
    extra = [anchor + int(j * gap + 0.5) for j in range(1, rest + 1)]
    return sorted(set(range(warm)) | set(extra))


class StepPolicy:
    """Base of step policies. ``needs_input``: whether ``decide`` uses the watched module's input."""

    needs_input = False

    def reset(self, num_steps: int | None) -> None:
        pass

    def decide(self, step: int, watched: torch.Tensor | None) -> bool:
        raise NotImplementedError

    def nbytes(self) -> int:
        return 0


class AllSteps(StepPolicy):
    """Every step is full (policy ``none``, and the reference for bit-identity)."""

    def decide(self, step: int, watched: torch.Tensor | None) -> bool:
        return True


class FixedSchedule(StepPolicy):
    """Full steps from a fixed list, or from (warmup, interval), or ``nfc`` evenly spread once the step count is
    known."""

    def __init__(self, warmup: int = 1, interval: int = 1, nfc: int | None = None,
                 full_steps: list[int] | None = None) -> None:
        self.warmup, self.interval, self.nfc = warmup, interval, nfc
        self.fixed = None if full_steps is None else frozenset(full_steps)
        self.full: frozenset[int] | None = self.fixed

    def reset(self, num_steps: int | None) -> None:
        if self.fixed is None and self.nfc is not None and num_steps is not None:
            self.full = frozenset(uniform_full_steps(num_steps, self.warmup, self.nfc))

    def decide(self, step: int, watched: torch.Tensor | None) -> bool:
        if self.full is not None:
            return step in self.full
        anchor = max(self.warmup, 1) - 1
        return step <= anchor or (step - anchor) % self.interval == 0


class RelationalSchedule(StepPolicy):
    """RCS: e(t+k) = ||I - I_T||_1 / ||I||_1 of the watched input's forecast; full step once sum(e) > tau.

    ``e`` is taken per sample and averaged over the batch, since the whole batch shares the step. tau = 0 makes
    every step full. ``errors`` keeps e of every step of the current generation (None on full steps), for analysis.
    """

    needs_input = True

    def __init__(self, tau: float, warmup: int, order: int, expansion: str = "newton",
                 store_dtype: torch.dtype = torch.float32) -> None:
        self.tau = tau
        self.warmup = warmup
        self.forecaster = Forecaster(order, expansion, store_dtype)
        self.reset(None)

    def reset(self, num_steps: int | None) -> None:
        self.forecaster.reset()
        self.acc = 0.0
        self.errors: list[float | None] = []

    def decide(self, step: int, watched: torch.Tensor | None) -> bool:
        full = step < self.warmup or self.forecaster.value is None or self.tau <= 0
        err = None
        if not full:
            err = float(relative_l1(watched, self.forecaster.predict(step)).mean())
            self.acc += err
            full = self.acc > self.tau
        self.errors.append(err)
        if full:
            self.acc = 0.0
            self.forecaster.update(step, watched)
        return full

    def nbytes(self) -> int:
        return self.forecaster.nbytes()


# ---- exact-count schedules on the error trace ------------------------------------------------------------------
def trace_costs(trace: list[torch.Tensor]) -> torch.Tensor:
    """E[p, s, t]: RCS's error at step t (mean over images of ||I_t - F_t||_1 / ||I_t||_1) when the last two full
    steps are p < s < t and F is the linear forecast through them (p = s: the last value, before a second full
    step). Shape (N, N, N), +inf where undefined."""
    n = len(trace)
    x = torch.stack(trace)  # (N, B, D)
    norms = x.abs().sum(-1).clamp_min(1e-12)  # (N, B)
    cost = torch.full((n, n, n), float("inf"), dtype=torch.float64)
    steps = torch.arange(n, dtype=torch.float32)
    for s in range(n - 1):
        ts = steps[s + 1:]
        for p in range(s + 1):
            slope = (x[s] - x[p]) / (s - p) if p < s else torch.zeros_like(x[s])
            pred = x[s][None] + (ts - s).view(-1, 1, 1) * slope[None]  # (T, B, D)
            err = (x[s + 1:] - pred).abs().sum(-1) / norms[s + 1:]
            cost[p, s, s + 1:] = err.mean(-1).double()
    return cost


def max_gap(steps: int, nfc: int, warmup: int) -> int:
    """The longest gap between full steps (the end of sampling counting as one) an exact-NFC schedule may leave:
    1.25x the even spacing of the free full steps. RCS's relative error is small in the middle of sampling and
    large at the end, where errors barely reach the final image; its schedules at low NFC leave long blind
    stretches in the middle (docs/cache.md, NFC 8), which this bound rules out."""
    warm = min(max(warmup, 1), steps)
    free = max(nfc - warm, 0)
    return max(2, math.ceil(1.25 * (steps - warm + 1) / (free + 1)))


def longest_gap(full_steps, steps: int) -> int:
    """The longest distance between consecutive full steps, the end of sampling (step ``steps``) included."""
    f = sorted(full_steps)
    return max(b - a for a, b in zip(f, f[1:] + [steps]))


def trace_full_steps(trace: list[torch.Tensor], nfc: int, warmup: int, gap: int | None = None) -> list[int]:
    """Exactly ``nfc`` full steps (the first ``warmup`` among them) minimising RCS's accumulated input error.

    On a cached step t after the full steps p < s, RCS's error is e(t) = E[p, s, t] (``trace_costs``); its
    accumulated error is A(t) = e(s+1) + ... + e(t). The chosen steps minimise the sum of A(t) over all cached
    steps, so long gaps cost quadratically (dynamic programming over the last two full steps), with no gap longer
    than ``gap`` (default ``max_gap``)."""
    n = len(trace)
    warm = min(max(warmup, 1), n)
    nfc = max(min(nfc, n), warm)
    if nfc == n:
        return list(range(n))
    gap_max = max_gap(n, nfc, warmup) if gap is None else gap
    e = trace_costs(trace)
    # gap[p, s, u]: cost of the cached steps s+1 .. u-1 between full steps s and u (u = n: to the end)
    acc = torch.cumsum(torch.nan_to_num(e, posinf=0.0), dim=2)  # A along t, from s+1 on (e is 0 for t <= s)
    acc2 = torch.cumsum(acc, dim=2)
    inf = float("inf")

    a2 = acc2.tolist()  # python floats: the search below indexes them millions of times

    def gap(p: int, s: int, u: int) -> float:
        return a2[p][s][u - 1] - a2[p][s][s] if u - 1 > s else 0.0

    # best[(p, s)] = (cost, previous state) with k full steps so far
    start = (max(warm - 2, 0), warm - 1)
    layer = {start: (0.0, None)}
    history = [layer]
    for _ in range(nfc - warm):
        nxt: dict[tuple[int, int], tuple[float, tuple[int, int]]] = {}
        for (p, s), (c, _) in layer.items():
            for u in range(s + 1, min(n, s + gap_max + 1)):
                cost = c + gap(p, s, u)
                if cost < nxt.get((s, u), (inf, None))[0]:
                    nxt[(s, u)] = (cost, (p, s))
        layer = nxt
        history.append(layer)
    ends = [k for k in layer if n - k[1] <= gap_max] or list(layer)
    end = min(ends, key=lambda k: layer[k][0] + gap(k[0], k[1], n))
    chain = [end]
    for h in reversed(history[1:]):
        chain.append(h[chain[-1]][1])
    full = set(range(warm)) | {s for _, s in chain}
    return sorted(full)
