"""A compressed model: quantized transformer + cache schedule + VC factors, generating as one object.

``CompressedModel`` is what ``qcache.compress`` builds in memory and what ``qcache.load`` returns from an artifact,
so the two generate bit-identically. Generation replays the static full-step schedule (``mode="static"``:
deterministic, exact NFC) or runs relational cache scheduling live with the tuned tau (``mode="live"``).
``parts`` (``qcache.families.ModelParts``) holds the conditioner (class labels, or prompt embeddings from the base
model's text encoders) and the VAE of latent-space models: ``generate`` returns decoded images.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

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
    schedule: StaticSchedule | None = None  # noqa: F821 - qcache.cache.StaticSchedule
    vc_factors: torch.Tensor | None = None  # (steps, channels)
    source: str = ""
    info: dict = field(default_factory=dict)  # manifest / report extras
    parts: ModelParts | None = None  # noqa: F821 - conditioner + VAE decoder; None: class model in pixel space

    def __post_init__(self) -> None:
        if self.parts is None:
            from .families.parts import default_parts

            self.parts = default_parts(self.transformer)

    @property
    def family(self) -> str:
        return self.parts.family.name

    @property
    def nfc(self) -> int:
        return self.schedule.nfc if self.schedule is not None else self.sampling.steps

    def attach_cache(self, mode: Mode = "static", sampler: Sampler | None = None):
        """The model's cache on its transformer (``qcache.cache.attach_schedule``: ``static`` replays the schedule,
        ``live`` runs RCS with the tuned tau), added to ``sampler``'s hooks when given; None without a cache.
        A context manager: it detaches on exit."""
        from .cache import attach_schedule

        return attach_schedule(self.transformer, self.schedule, self.cache, mode, sampler)

    @contextlib.contextmanager
    def sampler(self, mode: Mode = "static", vc: bool = True, conditioner=None,
                **sampling_overrides) -> Iterator[Sampler]:
        """A ``Sampler`` with the cache (and VC) attached for the duration of the block, detached after.

        ``conditioner`` replaces the model's own (e.g. one over other prompts, from ``prompt_conditioner``).
        """
        from .vc import VarianceCompensation

        cfg = dataclasses.replace(self.sampling, **sampling_overrides)
        built_steps = self.schedule.steps if self.schedule is not None else cfg.steps
        if cfg.steps != built_steps or cfg.scheduler != self.sampling.scheduler:
            raise QcacheError(f"sampling: the compressed model was built for {self.sampling.scheduler} with "
                              f"{built_steps} steps (its cache schedule), got {cfg.scheduler} with {cfg.steps} steps")
        if self.vc_factors is not None and vc and len(self.vc_factors) != cfg.steps:
            raise QcacheError(f"sampling: the VC factors were fitted for {len(self.vc_factors)} steps, got "
                              f"{cfg.steps} steps")
        s = Sampler(self.transformer, self.scheduler_config, cfg,
                    conditioner=conditioner if conditioner is not None else self.parts.conditioner)
        with self.attach_cache(mode, s) or contextlib.nullcontext():
            if vc and self.vc_factors is not None:
                s.hooks.append(VarianceCompensation(self.vc_factors))
            yield s

    def pipeline(self, mode: Mode = "static", vc: bool = True, **from_pretrained):
        """The base model's diffusers pipeline (``DiTPipeline``, ``PixArtAlphaPipeline``, ...) around the quantized
        transformer, with the cache and VC active; call it with ``num_inference_steps`` = the compressed steps.
        See ``qcache.export.to_pipeline``."""
        from .export import to_pipeline

        return to_pipeline(self, mode, vc, **from_pretrained)

    def prompt_conditioner(self, prompts: list[str]):
        """A conditioner over ``prompts`` (ids 0..len-1), encoded with the base model's text encoders."""
        from .families import PromptConditioner

        if not isinstance(self.parts.conditioner, PromptConditioner):
            raise QcacheError(f"prompts: {type(self.transformer).__name__} is class-conditional; pass labels instead")
        if not prompts:
            raise QcacheError("prompts: the prompt list is empty")
        return self.parts.conditioner.with_prompts(list(prompts))

    def generate(self, n: int, labels: torch.Tensor | None = None, seed: int | None = None,
                 mode: Mode = "static", progress: bool = False, prompts: list[str] | None = None,
                 decode: bool = True, **sampling_overrides) -> SampleSet:
        """Sample ``n`` images; same seed, same images.

        Class models: ``labels`` (default 0, 1, 2, ... cycling, or the recipe's ``condition.classes``). Text models:
        ``prompts`` (cycled over the n images; default: the recipe's prompt list) or ``labels`` as indices into the
        prompt list. Latent-space models return images decoded by the base model's VAE (``decode=False``: latents).
        """
        conditioner = None
        if prompts is not None:
            conditioner = self.prompt_conditioner(prompts)
            labels = torch.arange(n) % len(prompts) if labels is None else labels
        with self.sampler(mode, conditioner=conditioner, **sampling_overrides) as s:
            out = s.sample(n, seed=seed, labels=labels, progress=progress, desc="generating")
        return SampleSet(self.parts.to_pixels(out.images), out.labels) if decode else out
