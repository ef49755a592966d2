"""DiT (``DiTTransformer2DModel``, ``DiTPipeline``): class-conditional, null class = ``num_embeds_ada_norm``.

DiT-XL/2 predicts epsilon and a learned variance (8 output channels for 4 latent channels); the sampler keeps the
first ``in_channels`` output channels. Every block has its own timestep/label embedder and adaLN linear, which are
conditioning (weight-only quantization). The embedded ``builtin:digits`` model is a pixel-space DiT (no VAE).
"""

from __future__ import annotations

import torch

from .base import EPSILON_SCHEDULERS, CacheLayout, ModelFamily, QuantPatterns
from .blocks import basic_block_layout
from .conditions import ClassCondition, ClassConditioner, Condition


class DiTFamily(ModelFamily):
    name = "dit"
    transformer_classes = ("DiTTransformer2DModel",)
    pipeline_class = "DiTPipeline"
    schedulers = EPSILON_SCHEDULERS
    needs_vae = False  # pixel-space DiTs (builtin:digits) have none; DiT-XL/2 decodes through its pipeline's VAE
    quant = QuantPatterns(keep=("pos_embed.*", "proj_out*"),
                          conditioning=("*norm1.emb.*", "*norm1.linear", "adaln_single.*", "*time_proj*"))
    row_conditioning = ("*norm1.emb", "*norm1.linear", "proj_out_1")

    def forward(self, transformer: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        assert isinstance(cond, ClassCondition)
        return transformer(x, timestep=t, class_labels=cond.labels, return_dict=False)[0]

    def default_conditioner(self, transformer: torch.nn.Module) -> ClassConditioner:
        n = int(transformer.config.num_embeds_ada_norm)
        return ClassConditioner(n, n)

    def make_conditioner(self, transformer, source, cfg, prompts, device, dtype) -> ClassConditioner:
        n = int(transformer.config.num_embeds_ada_norm)
        return ClassConditioner(n, n, tuple(getattr(cfg, "classes", ()) or ()))

    def cache_layout(self, transformer: torch.nn.Module) -> CacheLayout:
        return basic_block_layout(transformer)
