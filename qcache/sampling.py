"""The denoising loop for diffusion transformers, with hook points for caching and variance compensation.

One ``Sampler`` owns a transformer, a diffusers scheduler (DDIM by default, DDPM, DPM-Solver++; flow-matching Euler
for flow models, with the family's sigmas and resolution shift), a conditioner and a list of ``SamplerHook``
objects. The model family (``qcache.families``) says how one step is called; the conditioner maps integer
condition ids (class labels, or indices into a prompt list) to conditions and gives the null condition of
classifier-free guidance. For every batch it calls, in order::

    hook.on_start(state)                      once, before the first step
    for each step:
        hook.before_model(state)              state.latents = x_t, state.timestep, state.index
        model call (CFG: conditional and unconditional halves in one batch; embedded guidance: the scale is an input)
        hook.after_model(state)               state.model_output = guided prediction (noise, or velocity)
        scheduler step
        hook.after_step(state)                state.latents = x_{t-1}; a hook may replace it
    hook.on_end(state)

The noise of a whole sample set comes from one seeded generator, and DDPM's per-step noise from a generator seeded
by (seed, batch index), so the same seed gives bit-identical images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .errors import QcacheError
from .families import Condition, Conditioner, family_for
from .families.dedup import conditioning_dedup
from .recipe import SamplingConfig

SCHEDULERS = ("ddim", "ddpm", "dpmsolver++", "flow-euler")


@dataclass
class StepState:
    """What a hook sees at a hook point. ``latents`` and ``model_output`` are float32, shape (B, C, H, W).

    ``class_labels`` are the batch's integer condition ids (class labels, or prompt indices for text models).
    """

    index: int
    num_steps: int
    timestep: torch.Tensor
    latents: torch.Tensor
    class_labels: torch.Tensor
    guidance_scale: float
    model_output: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


class SamplerHook:
    """Base class of sampler hooks; every method is optional. ``after_step`` may return new latents."""

    def on_start(self, state: StepState) -> None:
        pass

    def before_model(self, state: StepState) -> None:
        pass

    def after_model(self, state: StepState) -> None:
        pass

    def after_step(self, state: StepState) -> torch.Tensor | None:
        return None

    def on_end(self, state: StepState) -> None:
        pass


@dataclass
class SampleSet:
    """Generated samples: ``images`` (N, C, H, W) float32 on CPU, and the condition ids they were asked for.

    The sampler returns the final samples in the model's space (latents of latent-space models);
    ``ModelParts.to_pixels`` decodes them.
    """

    images: torch.Tensor
    labels: torch.Tensor


def make_scheduler(name: str, base_config: dict):
    """A fresh diffusers scheduler of kind ``name`` built on the model's training schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    base = {k: v for k, v in base_config.items() if not k.startswith("_")}
    if name == "flow-euler":
        return FlowMatchEulerDiscreteScheduler.from_config(base)
    if name == "ddim":
        return DDIMScheduler.from_config(base)
    if name == "ddpm":
        return DDPMScheduler.from_config(base)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++")
    raise ValueError(f"sampling.scheduler: must be one of {SCHEDULERS}, got {name!r}")


def make_noise(n: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Initial noise of a whole sample set, drawn on CPU from one generator so it does not depend on the device."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


class Sampler:
    """Samples a diffusers transformer with CFG through a diffusers scheduler, calling hooks at each step.

    ``conditioner`` maps condition ids to conditions (default: the family's class conditioner; text models need a
    ``PromptConditioner``).
    """

    def __init__(self, transformer: torch.nn.Module, scheduler_config: dict, config: SamplingConfig,
                 hooks: Sequence[SamplerHook] = (), conditioner: Conditioner | None = None) -> None:
        self.transformer = transformer
        self.scheduler_config = dict(scheduler_config)
        self.config = config
        self.hooks: list[SamplerHook] = list(hooks)
        self.family = family_for(transformer)
        self.conditioner = conditioner if conditioner is not None else self.family.default_conditioner(transformer)
        # guidance-distilled models (FLUX.1-dev) take the scale as an input: no CFG batch
        self.embedded_guidance = self.family.embeds_guidance(transformer)
        if config.scheduler in SCHEDULERS:
            self.family.check_scheduler(config.scheduler, transformer)
        make_scheduler(config.scheduler, self.scheduler_config)  # fail early on a bad name

    # ---- model facts -------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of condition ids: classes of a class model, prompts of a text model's prompt list."""
        return self.conditioner.num_ids

    @property
    def null_class(self) -> int:
        """The label the unconditional half of a CFG batch gets (class models: DiT's extra label-table row)."""
        null = getattr(self.conditioner, "null_class", None)
        if null is None:
            raise QcacheError(f"{type(self.transformer).__name__} is text-conditional: its null condition is the "
                              f"negative prompt, not a class")
        return int(null)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.family.sample_shape(self.transformer)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @contextlib.contextmanager
    def extra_hooks(self, *hooks: SamplerHook) -> Iterator[Sampler]:
        """Run the block with ``hooks`` appended after the sampler's own, and take them off again, even on error."""
        self.hooks.extend(hooks)
        try:
            yield self
        finally:
            for hook in hooks:
                self.hooks.remove(hook)

    # ---- one step ------------------------------------------------------------------------------------------
    @property
    def cfg_batch(self) -> bool:
        """Whether a model call carries the null condition's half (CFG); not for embedded-guidance models."""
        return self.config.guidance_scale > 1.0 and not self.embedded_guidance

    def model_condition(self, labels: torch.Tensor | Condition) -> Condition:
        """The condition of one model call for a batch of ids: with CFG, the conditional rows then the null rows;
        for embedded-guidance models, the rows with the guidance scale attached."""
        cond = labels if isinstance(labels, Condition) else self.conditioner.condition(labels)
        if self.embedded_guidance:
            cond = cond.with_guidance(self.config.guidance_scale)
        elif self.config.guidance_scale > 1.0:
            cond = cond.cat(self.conditioner.null(len(cond)))
        return cond.to(self.device, self.dtype)

    def predict_noise(self, latents: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor | Condition,
                      model_cond: Condition | None = None) -> torch.Tensor:
        """Guided prediction for x_t (noise, or velocity for flow models): conditional and unconditional halves in
        one model call. ``model_cond`` (from ``model_condition``) skips rebuilding the condition every step."""
        s = self.config.guidance_scale
        cfg = self.cfg_batch
        x = torch.cat([latents, latents]) if cfg else latents
        cond = self.model_condition(labels) if model_cond is None else model_cond
        t = timestep.expand(x.shape[0]).to(self.device)
        out = self.family.forward(self.transformer, x.to(self.dtype), t, cond).float()
        eps = out[:, : latents.shape[1]]  # learned-sigma models also predict variance channels: drop them
        if not cfg:
            return eps
        cond, uncond = eps.chunk(2)
        return uncond + s * (cond - uncond)

    # ---- loops ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, noise: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                bar: tqdm | None = None) -> torch.Tensor:
        """Run the whole denoising loop on one batch; returns x_0 (float32, on CPU)."""
        scheduler = make_scheduler(self.config.scheduler, self.scheduler_config)
        extra = self.family.timestep_kwargs(self.scheduler_config, self.sample_shape, self.transformer,
                                            steps=self.config.steps)
        scheduler.set_timesteps(self.config.steps, device=self.device, **extra)
        latents = noise.to(self.device, torch.float32) * getattr(scheduler, "init_noise_sigma", 1.0)
        model_cond = self.model_condition(labels.cpu())
        labels = labels.to(self.device)
        steps = len(scheduler.timesteps)
        scale_input = getattr(scheduler, "scale_model_input", None)
        state = StepState(0, steps, scheduler.timesteps[0], latents, labels, self.config.guidance_scale)
        # conditioning modules compute one row per distinct condition (families/dedup.py)
        with conditioning_dedup(self.transformer, self.family.row_conditioning, model_cond.row_groups()):
            for hook in self.hooks:
                hook.on_start(state)
            for i, t in enumerate(scheduler.timesteps):
                state.index, state.timestep, state.latents, state.model_output = i, t, latents, None
                for hook in self.hooks:
                    hook.before_model(state)
                model_in = latents if scale_input is None else scale_input(latents, t)
                state.model_output = self.predict_noise(model_in, t, labels, model_cond)
                for hook in self.hooks:
                    hook.after_model(state)
                latents = scheduler.step(state.model_output, t, latents, generator=generator, return_dict=False)[0]
                state.latents = latents
                for hook in self.hooks:
                    new = hook.after_step(state)
                    if new is not None:
                        latents = state.latents = new
                if bar is not None:
                    bar.update(1)
            for hook in self.hooks:
                hook.on_end(state)
        return latents.float().cpu()

    def sample(self, n: int, seed: int | None = None, labels: torch.Tensor | None = None,
               noise: torch.Tensor | None = None, progress: bool = True, desc: str = "sampling") -> SampleSet:
        """Sample n images in batches of ``config.batch_size``; seed (default ``config.seed``) fixes everything."""
        seed = self.config.seed if seed is None else seed
        labels = self.conditioner.default_ids(n) if labels is None else labels.long().cpu()
        self.conditioner.check_ids(labels)
        noise = make_noise(n, self.sample_shape, seed) if noise is None else noise
        if len(labels) != n or len(noise) != n:
            raise ValueError(f"need {n} labels and noise tensors, got {len(labels)} and {len(noise)}")
        bs = self.config.batch_size
        outs = []
        with tqdm(total=-(-n // bs) * self.config.steps, desc=desc, disable=not progress, leave=False) as bar:
            for b, start in enumerate(range(0, n, bs)):
                gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + b + 1)
                outs.append(self.denoise(noise[start:start + bs], labels[start:start + bs], gen, bar))
        return SampleSet(torch.cat(outs), labels)
