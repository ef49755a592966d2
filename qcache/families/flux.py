"""FLUX.1 (``FluxTransformer2DModel``, ``FluxPipeline``): double- and single-stream blocks, packed latents.

**Latents.** The sampler keeps FLUX latents unpacked, (16, H, W) as the VAE makes them, so hooks, VC, pools and
noise look the same as for every other latent model; ``forward`` packs them into 2x2 patches (``(H/2)·(W/2)``
tokens of 64 channels, ``FluxPipeline._pack_latents``) with their ``img_ids`` (row, column of each patch) and
unpacks the model output again. Packing is a permutation and the flow-matching Euler step is elementwise, so this is
the same arithmetic as the pipeline's packed loop. FLUX has no fixed resolution: the latent size is ``sample_size``
in the transformer's ``config.json`` when present, else 128 (1024 px, ``FluxPipeline.default_sample_size``).

**Text.** The pipeline's own CLIP text encoder gives the pooled embedding (``pooled_projections``) and its T5 encoder
the token sequence (``encoder_hidden_states``), through ``FluxPipeline.encode_prompt``; ``txt_ids`` are zeros as the
pipeline makes them. **Guidance.** Guidance-distilled checkpoints (config ``guidance_embeds: true``, FLUX.1-dev)
take the guidance scale as an input embedding: ``sampling.guidance_scale`` is passed as ``guidance`` and there is no
CFG batch (the sampler asks ``embeds_guidance``). Other checkpoints (``guidance_embeds: false``) run true CFG: the
negative prompt's half of the batch, combined as for every other family (``FluxPipeline``'s ``true_cfg_scale``).

**Timesteps.** Flow-matching Euler on FluxPipeline's sigmas ``linspace(1, 1/N, N)`` with the resolution-dependent
shift: ``mu = calculate_shift(image_seq_len, ...)`` from the scheduler config when it sets ``use_dynamic_shifting``.

**Cache layout.** Double-stream blocks (``transformer_blocks.i``): the joint attention ``attn`` (image and text
tokens in, both outputs out, cached as one tensor like SD3's), ``ff`` (image stream) and ``ff_context`` (text
stream), all taken before the block's adaLN gates. Single-stream blocks (``single_transformer_blocks.j``): the whole
block, cached as its **residual** (output minus input over the joint text+image sequence, gate included). A
single block's attention and MLP branch both feed one ``proj_out`` over their concatenation, so no sub-module
boundary inside it skips the block's matmuls (caching ``attn`` and ``proj_mlp`` would still run ``proj_out``, 5/12
of the block's linear FLOPs); the block's residual is the smallest unit that skips all of them, and caching the
residual rather than the output keeps the fresh residual stream flowing through on cached steps.

**Quantization.** ``time_text_embed`` (timestep, guidance and pooled-text embedders), ``context_embedder`` and the
adaLN modulation linears (``norm1`` / ``norm1_context`` / single blocks' ``norm``) are conditioning: weight-only.
``x_embedder`` (the packed latent in), ``norm_out.linear`` and ``proj_out`` (the velocity out) stay full precision.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import QcacheError
from .base import FLOW_SCHEDULERS, CacheLayout, ModelFamily, ModuleIO, QuantPatterns
from .conditions import Condition, PromptConditioner, TextCondition
from .sd3 import JOINT_IO
from .text import load_text_pipeline, pipeline_class_name, without_grad

DEFAULT_SAMPLE_SIZE = 128  # latent pixels; FluxPipeline.default_sample_size (1024 px through the 8x VAE)
DEFAULT_MAX_SEQUENCE = 512  # FluxPipeline's T5 token budget


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) latents -> (N, H/2 * W/2, 4C) tokens of 2x2 patches (``FluxPipeline._pack_latents``)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of height h and width w (``FluxPipeline._unpack_latents``)."""
    n, _, c4 = tokens.shape
    return tokens.view(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids of the packed patches: (0, row, column) (``_prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class SingleBlockIO(ModuleIO):
    """A FLUX single-stream block as one cacheable unit: input = the joint (text, image) sequence entering the
    block, cached quantity = the block's residual over it; ``unpack`` adds a forecast residual to the fresh input.

    The block is called as ``block(hidden_states=..., encoder_hidden_states=..., temb=..., ...)`` and returns
    ``(encoder_hidden_states, hidden_states)``. The cache hook calls ``input`` first on every call and then
    ``pack`` (full step) or ``unpack`` (cached step) on the same call, so ``pack`` takes the residual against the
    input of that call, kept only between the two (one instance per block).
    """

    def __init__(self) -> None:
        self._last: torch.Tensor | None = None

    @staticmethod
    def _streams(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        h = args[0] if args else kwargs["hidden_states"]
        c = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
        return h, c

    def input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        h, c = self._streams(args, kwargs)
        self._last = torch.cat([c, h], 1)  # the block's own order: text tokens first
        return self._last

    def pack(self, out: Any) -> torch.Tensor:
        last, self._last = self._last, None
        if last is None:
            raise QcacheError("cache: a FLUX single block's output was packed without its input")
        return torch.cat(out, 1) - last

    def unpack(self, packed: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        self._last = None
        h, c = self._streams(args, kwargs)
        n = c.shape[1]
        out_c, out_h = c + packed[:, :n], h + packed[:, n:]
        if out_h.dtype == torch.float16:  # as the block does
            out_c, out_h = out_c.clip(-65504, 65504), out_h.clip(-65504, 65504)
        return out_c, out_h


class FluxFamily(ModelFamily):
    name = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    pipeline_class = "FluxPipeline"
    schedulers = FLOW_SCHEDULERS
    text_conditioned = True
    needs_vae = True
    quant = QuantPatterns(keep=("x_embedder", "proj_out", "norm_out.linear"),
                          conditioning=("time_text_embed.*", "context_embedder", "*norm1.linear",
                                        "*norm1_context.linear", "single_transformer_blocks.*.norm.linear"))
    row_conditioning = ("time_text_embed", "context_embedder", "*norm1.linear", "*norm1_context.linear",
                        "single_transformer_blocks.*.norm.linear", "norm_out.linear")

    # ---- sampling -----------------------------------------------------------------------------------------------
    def sample_shape(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        c = transformer.config
        size = int(c.get("sample_size") or DEFAULT_SAMPLE_SIZE)
        if size % 2 or int(c.in_channels) % 4:
            raise QcacheError(f"model.source: FLUX packs 2x2 latent patches; sample_size ({size}) must be even and "
                              f"in_channels ({c.in_channels}) a multiple of 4")
        return (int(c.in_channels) // 4, size, size)

    def embeds_guidance(self, transformer: torch.nn.Module) -> bool:
        return bool(transformer.config.get("guidance_embeds", False))

    def timestep_kwargs(self, scheduler_config: dict, sample_shape: tuple[int, int, int],
                        transformer: torch.nn.Module, steps: int | None = None) -> dict:
        """FluxPipeline's sigmas ``linspace(1, 1/N, N)`` and, with ``use_dynamic_shifting``, its shift ``mu`` from
        the packed image sequence length."""
        import numpy as np

        out: dict = {}
        if steps and not scheduler_config.get("use_flow_sigmas"):
            out["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        if scheduler_config.get("use_dynamic_shifting"):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            seq = (sample_shape[1] // 2) * (sample_shape[2] // 2)
            g = scheduler_config.get
            out["mu"] = calculate_shift(seq, g("base_image_seq_len", 256), g("max_image_seq_len", 4096),
                                        g("base_shift", 0.5), g("max_shift", 1.15))
        return out

    def forward(self, transformer: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        assert isinstance(cond, TextCondition)
        n, _, h, w = x.shape
        guidance = None
        if self.embeds_guidance(transformer):
            if cond.guidance is None:
                raise QcacheError("sampling.guidance_scale: this FLUX checkpoint embeds the guidance scale "
                                  "(guidance_embeds: true) but none was given with the condition")
            guidance = cond.guidance.to(x.device)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        # FluxPipeline passes timestep / 1000 in the latents' dtype; the model multiplies by 1000 again
        out = transformer(hidden_states=pack_latents(x), timestep=t.to(x.dtype) / 1000, guidance=guidance,
                          pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=txt_ids,
                          img_ids=image_ids(h, w, x.device, x.dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)

    # ---- conditioning -------------------------------------------------------------------------------------------
    def make_conditioner(self, transformer, source, cfg, prompts, device, dtype) -> PromptConditioner:
        if not prompts:
            raise QcacheError(f"condition.prompts: {type(transformer).__name__} is text-conditional and needs a "
                              f"prompt list")
        pipe = load_text_pipeline(pipeline_class_name(source, self.pipeline_class), source, dtype, device)
        max_len = getattr(cfg, "max_sequence_length", None) or DEFAULT_MAX_SEQUENCE
        if max_len > 512:
            raise QcacheError(f"condition.max_sequence_length: FLUX's T5 budget is at most 512 tokens, got {max_len}")

        @without_grad
        def encode(texts: list[str]) -> TextCondition:
            embeds, pooled, _ = pipe.encode_prompt(texts, None, device=device, max_sequence_length=max_len)
            return TextCondition(embeds.to(dtype), None, pooled.to(dtype))

        return PromptConditioner.encode(prompts, encode, getattr(cfg, "negative_prompt", "") or "")

    # ---- cache ---------------------------------------------------------------------------------------------------
    def cache_layout(self, transformer: torch.nn.Module) -> CacheLayout:
        double = getattr(transformer, "transformer_blocks", None)
        single = getattr(transformer, "single_transformer_blocks", None)
        if double is None or single is None or len(double) + len(single) == 0:
            raise QcacheError(f"cache: no adapter for {type(transformer).__name__} (no FLUX blocks)")
        names: list[str] = []
        io: dict[str, ModuleIO] = {}
        for i in range(len(double)):
            names += [f"transformer_blocks.{i}.attn", f"transformer_blocks.{i}.ff",
                      f"transformer_blocks.{i}.ff_context"]
            io[names[-3]] = JOINT_IO
        for j in range(len(single)):
            names.append(f"single_transformer_blocks.{j}")
            io[names[-1]] = SingleBlockIO()
        blocks = tuple(f"transformer_blocks.{i}" for i in range(len(double)))
        blocks += tuple(f"single_transformer_blocks.{j}" for j in range(len(single)))
        return CacheLayout(tuple(names), names[0], io, blocks)
