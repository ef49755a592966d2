"""PixArt-α / PixArt-Σ (``PixArtTransformer2DModel``, ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``).

Text-conditional through T5 embeddings with an attention mask (cross-attention ``attn2``); one shared
``adaln_single`` makes the timestep modulation of every block, and ``caption_projection`` maps the T5 features to
the model width (both conditioning: weight-only quantization). The blocks are ``BasicTransformerBlock``s, so the
cacheable modules are ``attn1`` / ``attn2`` / ``ff``. Models trained at 1024 px (sample_size 128) also take the
resolution and aspect ratio as conditions; the others get ``added_cond_kwargs={"resolution": None,
"aspect_ratio": None}`` as the diffusers pipeline passes them. Epsilon prediction with learned sigma (8 output
channels for 4 latent channels).
"""

from __future__ import annotations

import torch

from .base import EPSILON_SCHEDULERS, CacheLayout, ModelFamily, QuantPatterns
from .blocks import basic_block_layout
from .conditions import Condition, PromptConditioner, TextCondition
from .text import load_text_pipeline, pipeline_class_name, without_grad

VAE_SCALE = 8  # pixels per latent position of the PixArt / SD VAEs
DEFAULT_MAX_SEQUENCE = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


class PixArtFamily(ModelFamily):
    name = "pixart"
    transformer_classes = ("PixArtTransformer2DModel",)
    pipeline_class = "PixArtAlphaPipeline"
    schedulers = EPSILON_SCHEDULERS
    text_conditioned = True
    needs_vae = True
    quant = QuantPatterns(keep=("pos_embed.*", "proj_out*"), conditioning=("adaln_single.*", "caption_projection.*"))
    row_conditioning = ("adaln_single", "caption_projection")

    def added_cond_kwargs(self, transformer: torch.nn.Module, x: torch.Tensor) -> dict:
        if not getattr(transformer, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        h, w = x.shape[-2] * VAE_SCALE, x.shape[-1] * VAE_SCALE
        n = x.shape[0]
        return {"resolution": torch.tensor([[h, w]], dtype=x.dtype, device=x.device).repeat(n, 1),
                "aspect_ratio": torch.tensor([[h / w]], dtype=x.dtype, device=x.device).repeat(n, 1)}

    def forward(self, transformer: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        assert isinstance(cond, TextCondition)
        return transformer(x, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=t,
                           added_cond_kwargs=self.added_cond_kwargs(transformer, x), return_dict=False)[0]

    def make_conditioner(self, transformer, source, cfg, prompts, device, dtype) -> PromptConditioner:
        from ..errors import QcacheError

        if not prompts:
            raise QcacheError(f"condition.prompts: {type(transformer).__name__} is text-conditional and needs a "
                              f"prompt list")
        cls = pipeline_class_name(source, self.pipeline_class)
        pipe = load_text_pipeline(cls, source, dtype, device)
        max_len = getattr(cfg, "max_sequence_length", None) or DEFAULT_MAX_SEQUENCE.get(cls, 120)

        @without_grad
        def encode(texts: list[str]) -> TextCondition:
            embeds, mask, _, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, device=device,
                                                    clean_caption=False, max_sequence_length=max_len)
            return TextCondition(embeds.to(dtype), mask)

        return PromptConditioner.encode(prompts, encode, getattr(cfg, "negative_prompt", "") or "")

    def cache_layout(self, transformer: torch.nn.Module) -> CacheLayout:
        return basic_block_layout(transformer)
