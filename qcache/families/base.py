"""``ModelFamily``: everything qcache must know about one kind of diffusers transformer, in one object.

A family tells

- the **sampler** how to call one denoising step (``forward``), what shape a sample has, which schedulers fit the
  model's training objective (epsilon prediction or flow matching) and how to set their timesteps;
- the **conditioner** what conditions the model (``make_conditioner``: class labels with a null class, or prompt
  embeddings from the pipeline's own text encoders);
- the **cache** which modules are cacheable, in call order, and how their calls map to tensors
  (``cache_layout``; the first module is the one relational cache scheduling watches);
- the **quantizer** which modules stay in full precision and which are conditioning (weights only);
- the **decoder** how latents become images through the pipeline's VAE.

Subclasses live in ``dit.py``, ``pixart.py``, ``sd3.py``, ``flux.py``; ``registry.py`` picks one from the
transformer class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import QcacheError
from .conditions import Condition, Conditioner


class ModuleIO:
    """How a cacheable module's call maps to the tensors the cache works on (default: one tensor in, one out).

    ``input`` is what RFE measures and RCS watches; ``pack`` turns the module's output into one tensor to store
    and forecast, ``unpack`` turns a forecast back into what the module would have returned.
    """

    def input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def pack(self, out: Any) -> torch.Tensor:
        return out

    def unpack(self, packed: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        return packed


DEFAULT_IO = ModuleIO()


@dataclass(frozen=True)
class CacheLayout:
    """Names of the cacheable modules, in call order, the one whose input drives the step decision, and the
    ``ModuleIO`` of the modules whose call is not one tensor in, one tensor out.

    ``blocks``: the transformer blocks in call order (``cache.granularity: block | span`` caches their residuals);
    ``io`` may hold a block's ``ModuleIO`` too (its hidden state in and out, as one tensor)."""

    names: tuple[str, ...]
    watched: str
    io: Mapping[str, ModuleIO] = field(default_factory=dict)
    blocks: tuple[str, ...] = ()

    def io_of(self, name: str) -> ModuleIO:
        return self.io.get(name, DEFAULT_IO)


@dataclass(frozen=True)
class QuantPatterns:
    """fnmatch patterns of module names: ``keep`` stays full precision, ``conditioning`` gets weight-only
    quantization (per ``quant.conditioning_weights``) and never activation quantization."""

    keep: tuple[str, ...]
    conditioning: tuple[str, ...]


EPSILON_SCHEDULERS = ("ddim", "ddpm", "dpmsolver++")
FLOW_SCHEDULERS = ("flow-euler",)


class ModelFamily:
    """Base class of the model families; see the module docstring for what each method is for."""

    name: str = ""
    transformer_classes: tuple[str, ...] = ()
    pipeline_class: str = ""
    schedulers: tuple[str, ...] = EPSILON_SCHEDULERS
    text_conditioned: bool = False
    needs_vae: bool = True  # latent-space model: images come from the pipeline's VAE
    quant: QuantPatterns = QuantPatterns((), ())
    # modules computing each batch row from the timestep and the condition alone (embedders, adaLN linears):
    # computed once per distinct condition while sampling (fnmatch patterns of module names; dedup.py)
    row_conditioning: tuple[str, ...] = ()

    # ---- sampling -----------------------------------------------------------------------------------------------
    def sample_shape(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        """(C, H, W) of one sample as the transformer receives it (a latent for latent-space models)."""
        c = transformer.config
        return (int(c.in_channels), int(c.sample_size), int(c.sample_size))

    def check_scheduler(self, scheduler: str, transformer: torch.nn.Module) -> None:
        """One-line error when ``sampling.scheduler`` does not fit the model's training objective."""
        if scheduler not in self.schedulers:
            raise QcacheError(f"sampling.scheduler: {type(transformer).__name__} ({self.name}) samples with "
                              f"{' | '.join(self.schedulers)}, got {scheduler!r}")

    def timestep_kwargs(self, scheduler_config: dict, sample_shape: tuple[int, int, int],
                        transformer: torch.nn.Module, steps: int | None = None) -> dict:
        """Extra keyword arguments of ``scheduler.set_timesteps`` for ``steps`` steps (e.g. flow matching's
        resolution shift, FLUX's sigmas)."""
        return {}

    def embeds_guidance(self, transformer: torch.nn.Module) -> bool:
        """Whether the guidance scale is a model input (guidance-distilled checkpoints: no CFG batch)."""
        return False

    def forward(self, transformer: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """One model call on a batch: returns the raw output (N, C', H, W) in the model's dtype."""
        raise NotImplementedError

    # ---- conditioning -------------------------------------------------------------------------------------------
    def default_conditioner(self, transformer: torch.nn.Module) -> Conditioner:
        """The conditioner used when none is given (class models only; text models need prompts)."""
        raise QcacheError(f"condition.prompts: {type(transformer).__name__} is text-conditional and needs a prompt "
                          f"list (condition.prompts) or a PromptConditioner")

    def make_conditioner(self, transformer: torch.nn.Module, source: str, cfg: Any, prompts: list[str] | None,
                         device: torch.device, dtype: torch.dtype) -> Conditioner:
        """The conditioner of a recipe (``cfg`` = its ``condition`` section; ``prompts`` already read)."""
        return self.default_conditioner(transformer)

    # ---- cache ---------------------------------------------------------------------------------------------------
    def cache_layout(self, transformer: torch.nn.Module) -> CacheLayout:
        raise NotImplementedError

    # ---- VAE -----------------------------------------------------------------------------------------------------
    def decode(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from the pipeline's VAE (diffusers' ``latents / scaling_factor (+ shift)`` rule)."""
        cfg = vae.config
        z = latents / cfg.scaling_factor
        shift = getattr(cfg, "shift_factor", None)
        if shift is not None:
            z = z + shift
        p = next(vae.parameters())
        return vae.decode(z.to(p.device, p.dtype), return_dict=False)[0].float().clamp(-1, 1)
