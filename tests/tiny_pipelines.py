"""Tiny random-weight diffusers pipelines of the real classes, written to disk in pipeline layout (no downloads).

``dit_pipeline``: ``DiTPipeline`` (DiTTransformer2DModel with learned sigma and 1000 classes + AutoencoderKL + DDIM).
``pixart_pipeline``: ``PixArtAlphaPipeline`` (PixArtTransformer2DModel + T5EncoderModel + a T5 tokenizer built here
from a word-level Unigram vocabulary + AutoencoderKL + DPM-Solver). ``sd3_pipeline``: ``StableDiffusion3Pipeline``
(SD3Transformer2DModel + two CLIP text encoders with projection and CLIP BPE tokenizers built here + T5 + VAE +
FlowMatchEulerDiscreteScheduler). ``flux_pipeline``: ``FluxPipeline`` (FluxTransformer2DModel with or without the
guidance embedding + CLIPTextModel (pooled) + T5 + VAE with shift + FlowMatchEulerDiscreteScheduler with FLUX.1's
dynamic shifting). Weights are drawn with a fixed seed, so every build is the same model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

WORDS = ("a photo of the an in on with and red blue green yellow black white small large old new cat dog bird "
         "horse car boat house tree flower mountain river city street beach forest sky night sunset painting "
         "portrait close up view at watercolor oil sketch under snow rain light dark bright wooden glass stone "
         "castle robot bicycle bridge lake field garden kitchen table cup book lamp window door clock").split()


def prompts(n: int = 6) -> list[str]:
    """n short prompts made of the tiny vocabulary."""
    subjects = ["cat", "dog", "bird", "horse", "car", "boat", "house", "tree", "castle", "robot"]
    styles = ["a photo of a red", "a painting of a blue", "a sketch of an old", "a watercolor of a small"]
    places = ["in the snow", "on the beach", "at sunset", "in a forest", "under the night sky"]
    return [f"{styles[i % 4]} {subjects[i % 10]} {places[i % 5]}" for i in range(n)]


def _randomize(model: torch.nn.Module, std: float = 0.15, seed: int = 0) -> torch.nn.Module:
    """diffusers zero-initialises adaLN-Zero gates and output layers; draw every weight so the model does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_vae(latent_channels: int = 4, shift: float | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    kw = {} if shift is None else {"shift_factor": shift}
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                         layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.5, **kw).eval()


def t5_tokenizer():
    """A T5 tokenizer (Unigram over whole words, transformers' T5Tokenizer) for the tiny vocabulary."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(WORDS) + 40, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg).eval()


def clip_tokenizer(max_length: int = 48):
    """A CLIP BPE tokenizer over characters (no merges) for the tiny vocabulary."""
    from transformers import CLIPTokenizer

    chars = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz"))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_clip(hidden: int = 16, vocab: int = 64, max_length: int = 48, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_length, projection_dim=hidden,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(cfg).eval()


def tiny_clip_text(hidden: int = 16, vocab: int = 64, max_length: int = 48, seed: int = 0):
    """A ``CLIPTextModel`` (FLUX uses its pooled output only)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    return CLIPTextModel(cfg).eval()


# FLUX.1-dev's scheduler_config.json (dynamic shifting on the packed image sequence length)
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def flux_pipeline(root: Path, guidance_embeds: bool = True, sample_size: int = 8) -> Path:
    """FluxPipeline layout: FLUX transformer (1 double + 2 single blocks; ``guidance_embeds`` as FLUX.1-dev, or true
    CFG without it) + CLIP (pooled) + T5 + VAE (4 latent channels, packed to 16) + flow Euler with dynamic shift.
    ``sample_size`` (latent pixels) goes into the transformer's config.json: FLUX itself has no fixed resolution."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    tr.register_to_config(sample_size=sample_size)
    FluxPipeline(transformer=_randomize(tr, std=0.1), scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                 vae=tiny_vae(shift=0.1), text_encoder=tiny_clip_text(seed=1), tokenizer=clip_tokenizer(),
                 text_encoder_2=tiny_t5(), tokenizer_2=t5_tokenizer()).save_pretrained(root)
    return root


def dit_pipeline(root: Path) -> Path:
    """DiTPipeline layout: a latent DiT (4 channels, learned sigma, 1000 classes, null class 1000) + VAE + DDIM."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    DiTPipeline(transformer=_randomize(dit), vae=tiny_vae(), scheduler=sched).save_pretrained(root)
    return root


def pixart_pipeline(root: Path) -> Path:
    """PixArtAlphaPipeline layout: PixArt transformer + T5 encoder + T5 tokenizer + VAE + DPM-Solver."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    tr = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                  caption_channels=32, num_embeds_ada_norm=1000)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear")
    PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(), transformer=_randomize(tr),
                        scheduler=sched).save_pretrained(root)
    return root


def sd3_pipeline(root: Path) -> Path:
    """StableDiffusion3Pipeline layout: SD3 transformer + two CLIP encoders + T5 + VAE (with shift) + flow Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                               pooled_projection_dim=32, out_channels=4, pos_embed_max_size=8)
    tok = clip_tokenizer()
    StableDiffusion3Pipeline(transformer=_randomize(tr), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                             vae=tiny_vae(shift=0.1), text_encoder=tiny_clip(seed=1), tokenizer=tok,
                             text_encoder_2=tiny_clip(seed=2), tokenizer_2=clip_tokenizer(), text_encoder_3=tiny_t5(),
                             tokenizer_3=t5_tokenizer()).save_pretrained(root)
    return root


def words_ok(text: str) -> bool:
    """Whether every word of ``text`` is in the tiny vocabulary."""
    return all(w in WORDS for w in re.findall(r"[a-z]+", text.lower()))
