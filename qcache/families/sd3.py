"""Stable Diffusion 3 (``SD3Transformer2DModel``, ``StableDiffusion3Pipeline``): joint (MMDiT) blocks, flow matching.

Conditioning: sequence embeddings (CLIP-L + CLIP-G hidden states padded to the T5 width, then T5 tokens) and
pooled CLIP embeddings, from the pipeline's own ``encode_prompt``. The model predicts a velocity under
``FlowMatchEulerDiscreteScheduler`` (recipe ``sampling.scheduler: flow-euler``); CFG combines the two halves the
same way as for epsilon.

Cache layout of a ``JointTransformerBlock``: the joint attention ``attn`` (image and text tokens in, both outputs
out; cached as one tensor, the two streams concatenated along the tokens), ``attn2`` of SD3.5's dual-attention
blocks, ``ff`` (image stream) and ``ff_context`` (text stream; the last block has none). All outputs are taken
before the block's adaLN gates, so gates and residuals run on every step. The watched module is the first block's
``attn``: its input depends only on (x_t, t, text), before any expensive module runs.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import QcacheError
from .base import FLOW_SCHEDULERS, CacheLayout, ModelFamily, ModuleIO, QuantPatterns
from .conditions import Condition, PromptConditioner, TextCondition
from .text import load_text_pipeline, pipeline_class_name, without_grad


class JointAttentionIO(ModuleIO):
    """SD3's joint attention: (image tokens, text tokens) in and out, handled as one tensor concatenated on dim 1."""

    @staticmethod
    def _streams(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = args[0] if args else kwargs["hidden_states"]
        c = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        return h, c

    def input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        h, c = self._streams(args, kwargs)
        return h if c is None else torch.cat([h, c], 1)

    def pack(self, out: Any) -> torch.Tensor:
        return torch.cat(out, 1) if isinstance(out, tuple) else out

    def unpack(self, packed: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        h, c = self._streams(args, kwargs)
        if c is None:
            return packed
        n = h.shape[1]
        return packed[:, :n], packed[:, n:]


JOINT_IO = JointAttentionIO()


class JointBlockIO(JointAttentionIO):
    """SD3's ``JointTransformerBlock``: (image, text) hidden states in, (text, image) out, as one tensor (image tokens
    first). The last block (``context_pre_only``) returns no text stream: its output is the image tokens only."""

    def pack(self, out: Any) -> torch.Tensor:
        c, h = out
        return h if c is None else torch.cat([h, c], 1)

    def unpack(self, packed: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        h, _ = self._streams(args, kwargs)
        n = h.shape[1]
        return (None, packed) if packed.shape[1] == n else (packed[:, n:], packed[:, :n])


JOINT_BLOCK_IO = JointBlockIO()


class SD3Family(ModelFamily):
    name = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)
    pipeline_class = "StableDiffusion3Pipeline"
    schedulers = FLOW_SCHEDULERS
    text_conditioned = True
    needs_vae = True
    quant = QuantPatterns(keep=("pos_embed.*", "proj_out*"),
                          conditioning=("time_text_embed.*", "context_embedder", "*norm1.linear",
                                        "*norm1_context.linear", "norm_out.linear"))
    row_conditioning = ("time_text_embed", "context_embedder", "*norm1.linear", "*norm1_context.linear",
                        "norm_out.linear")

    def timestep_kwargs(self, scheduler_config: dict, sample_shape: tuple[int, int, int],
                        transformer: torch.nn.Module, steps: int | None = None) -> dict:
        """Resolution-dependent shift ``mu`` for schedulers with ``use_dynamic_shifting`` (as the pipeline does)."""
        if not scheduler_config.get("use_dynamic_shifting"):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        p = int(transformer.config.patch_size)
        seq = (sample_shape[1] // p) * (sample_shape[2] // p)
        g = scheduler_config.get
        return {"mu": calculate_shift(seq, g("base_image_seq_len", 256), g("max_image_seq_len", 4096),
                                      g("base_shift", 0.5), g("max_shift", 1.16))}

    def forward(self, transformer: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        assert isinstance(cond, TextCondition)
        return transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                           pooled_projections=cond.pooled, return_dict=False)[0]

    def make_conditioner(self, transformer, source, cfg, prompts, device, dtype) -> PromptConditioner:
        if not prompts:
            raise QcacheError(f"condition.prompts: {type(transformer).__name__} is text-conditional and needs a "
                              f"prompt list")
        pipe = load_text_pipeline(pipeline_class_name(source, self.pipeline_class), source, dtype, device)
        max_len = getattr(cfg, "max_sequence_length", None) or 256

        @without_grad
        def encode(texts: list[str]) -> TextCondition:
            embeds, _, pooled, _ = pipe.encode_prompt(texts, None, None, device=device,
                                                      do_classifier_free_guidance=False, max_sequence_length=max_len)
            return TextCondition(embeds.to(dtype), None, pooled.to(dtype))

        return PromptConditioner.encode(prompts, encode, getattr(cfg, "negative_prompt", "") or "")

    def cache_layout(self, transformer: torch.nn.Module) -> CacheLayout:
        blocks = getattr(transformer, "transformer_blocks", None)
        if blocks is None or len(blocks) == 0:
            raise QcacheError(f"cache: no adapter for {type(transformer).__name__} (no transformer_blocks)")
        names: list[str] = []
        io: dict[str, ModuleIO] = {}
        for i, block in enumerate(blocks):
            io[f"transformer_blocks.{i}"] = JOINT_BLOCK_IO
            names.append(f"transformer_blocks.{i}.attn")
            io[names[-1]] = JOINT_IO
            if getattr(block, "attn2", None) is not None:
                names.append(f"transformer_blocks.{i}.attn2")
            names.append(f"transformer_blocks.{i}.ff")
            if getattr(block, "ff_context", None) is not None:
                names.append(f"transformer_blocks.{i}.ff_context")
        return CacheLayout(tuple(names), names[0], io, tuple(f"transformer_blocks.{i}" for i in range(len(blocks))))
