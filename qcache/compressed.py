"""A compressed model: quantized transformer + cache schedule + VC factors, generating as one object.

``CompressedModel`` is what ``qcache.compress`` builds in memory and what ``qcache.load`` returns from an artifact,
so the two generate bit-identically. Generation replays the static full-step schedule (``mode="static"``:
deterministic, exact NFC) or runs relational cache scheduling live with the tuned tau (``mode="live"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch

from .errors import QcacheError
from .recipe import CacheConfig, SamplingConfig
from .sampling import Sampler, SampleSet

Mode = Literal["static", "live"]


@dataclass
class CompressedModel:
    """Everything needed to generate with quantization, feature caching and variance compensation active."""

    transformer: torch.nn.Module
    scheduler_config: dict
    sampling: SamplingConfig
    cache: CacheConfig
    schedule: "StaticSchedule | None" = None  # noqa: F821 - qcache.cache.StaticSchedule
    vc_factors: torch.Tensor | None = None  # (steps, channels)
    source: str = ""
    info: dict = field(default_factory=dict)  # manifest / report extras

    @property
    def nfc(self) -> int:
        return self.schedule.nfc if self.schedule is not None else self.sampling.steps

    def _attach_cache(self, sampler: Sampler, mode: Mode):
        from .cache import attach_cache, replay

        if self.schedule is None or self.schedule.policy == "none":
            return None
        if mode == "static":
            return replay(sampler, self.schedule, self.cache)
        if mode != "live":
            raise QcacheError(f"mode: must be 'static' or 'live', got {mode!r}")
        cfg = self.schedule.config(self.cache)
        cache = attach_cache(self.transformer, cfg, tau=cfg.tau)
        sampler.hooks.append(cache)
        return cache

    @contextlib.contextmanager
    def sampler(self, mode: Mode = "static", vc: bool = True, **sampling_overrides) -> Iterator[Sampler]:
        """A ``Sampler`` with the cache (and VC) attached for the duration of the block, detached after."""
        from .vc import VarianceCompensation

        cfg = dataclasses.replace(self.sampling, **sampling_overrides)
        if (self.schedule is not None and cfg.steps != self.schedule.steps) or cfg.scheduler != self.sampling.scheduler:
            raise QcacheError(f"sampling: the compressed model was built for {self.sampling.scheduler} with "
                              f"{self.sampling.steps} steps, got {cfg.scheduler} with {cfg.steps}")
        s = Sampler(self.transformer, self.scheduler_config, cfg)
        cache = self._attach_cache(s, mode)
        if vc and self.vc_factors is not None:
            s.hooks.append(VarianceCompensation(self.vc_factors))
        try:
            yield s
        finally:
            if cache is not None:
                cache.remove()

    def generate(self, n: int, labels: torch.Tensor | None = None, seed: int | None = None,
                 mode: Mode = "static", progress: bool = False, **sampling_overrides) -> SampleSet:
        """Sample ``n`` images (labels default to 0, 1, 2, ... cycling); same seed, same images."""
        with self.sampler(mode, **sampling_overrides) as s:
            return s.sample(n, seed=seed, labels=labels, progress=progress, desc="generating")
