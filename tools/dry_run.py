"""Real-size dry run: the compress pipeline on a random-weight transformer built from a published model config.

    python tools/dry_run.py --config dit-xl-2-256|pixart-alpha-512|sd3-medium|flux-dev-1024 [--blocks K]
                            [--steps N] [--images N] [--work DIR] [--json PATH]

What is real: the transformer (the diffusers class with the published ``config.json`` below, random weights; its depth
reduced to ``--blocks K`` where the full model does not fit in memory: for FLUX, K double-stream and 2K
single-stream blocks, the published 19:38 ratio), the resolution, the scheduler config, the text-embedding and
latent shapes, and the compress pipeline itself (``qcache.compress.compress`` on the shipped recipe of that model,
with its quantization, cache policy and VC settings). What is a stand-in: the text encoders (one-layer T5 / CLIP
models of the real output widths and token budgets, word-level tokenizers) and the VAE (8x, 4 blocks of 8 channels,
the real latent channels, scaling and shift factors): they produce tensors of the real shapes, not real images.
The settings are tiny: ``--steps`` denoising steps (fixed cache schedule, half of them full, so no tau tuning),
``--images`` images for the pool, VC, evaluation and latency. On CPU the model runs in float32 (the recipes' fp16/bf16
is for GPUs).

Building the random pipeline and compressing run in two child processes, so ``peak_rss_bytes`` (``getrusage`` max
RSS of the second) is that of loading the pipeline and compressing, not of building the random model.
Output (``--json``): ``config``, ``blocks``,
``params``, ``peak_rss_bytes``, ``cache_bytes_per_image`` (the cache state of one generation divided by its
images, measured with the compressed model's static schedule), ``artifact_bytes`` (every file of the artifact),
``stage_seconds`` (the compress report's stages, plus ``build`` and ``total``), ``stand_ins``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qcache.cli import run_cli  # noqa: E402
from qcache.errors import QcacheError  # noqa: E402

# ---- the published configs (transformer/config.json and scheduler/scheduler_config.json of each hub repository) --
CONFIGS: dict[str, dict] = {
    "dit-xl-2-256": {  # facebook/DiT-XL-2-256
        "recipe": "dit-xl-2-256.yaml", "pipeline": "DiTPipeline", "transformer": "DiTTransformer2DModel",
        "config": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                       dropout=0.0, norm_num_groups=32, attention_bias=True, sample_size=32, patch_size=2,
                       activation_fn="gelu-approximate", num_embeds_ada_norm=1000, upcast_attention=False,
                       norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5),
        "scheduler": ("DDIMScheduler", dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                            beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)),
        "vae": dict(latent_channels=4, scaling_factor=0.18215),
        "tiny": dict(num_attention_heads=2, attention_head_dim=8, sample_size=8),
    },
    "pixart-alpha-512": {  # PixArt-alpha/PixArt-XL-2-512x512
        "recipe": "pixart-alpha-512.yaml", "pipeline": "PixArtAlphaPipeline",
        "transformer": "PixArtTransformer2DModel",
        "config": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                       dropout=0.0, norm_num_groups=32, cross_attention_dim=1152, attention_bias=True,
                       sample_size=64, patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                       upcast_attention=False, norm_type="ada_norm_single", norm_elementwise_affine=False,
                       norm_eps=1e-6, caption_channels=4096, use_additional_conditions=False),
        "scheduler": ("DPMSolverMultistepScheduler", dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                                          beta_schedule="linear", solver_order=2,
                                                          algorithm_type="dpmsolver++")),
        "vae": dict(latent_channels=4, scaling_factor=0.18215),
        "t5": "caption_channels",
        "tiny": dict(num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
                     sample_size=8),
    },
    "sd3-medium": {  # stabilityai/stable-diffusion-3-medium-diffusers
        "recipe": "sd3-medium.yaml", "pipeline": "StableDiffusion3Pipeline", "transformer": "SD3Transformer2DModel",
        "config": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
        "vae": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        "t5": "joint_attention_dim", "clip": (768, 1280),  # CLIP-L, CLIP-G widths (pooled: their sum)
        "tiny": dict(num_attention_heads=2, attention_head_dim=8, joint_attention_dim=32, caption_projection_dim=16,
                     pooled_projection_dim=16, sample_size=8, pos_embed_max_size=8),
        "tiny_clip": (8, 8),
    },
    "flux-dev-1024": {  # black-forest-labs/FLUX.1-dev (no sample_size: FluxPipeline's default 128 latent pixels)
        "recipe": "flux-dev-1024.yaml", "pipeline": "FluxPipeline", "transformer": "FluxTransformer2DModel",
        "config": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", dict(base_image_seq_len=256, base_shift=0.5,
                                                              max_image_seq_len=4096, max_shift=1.15,
                                                              num_train_timesteps=1000, shift=3.0,
                                                              use_dynamic_shifting=True)),
        "vae": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        "t5": "joint_attention_dim", "clip": (768,),  # CLIP-L (pooled only)
        "tiny": dict(num_attention_heads=2, attention_head_dim=8, axes_dims_rope=(2, 2, 4), joint_attention_dim=32,
                     pooled_projection_dim=16, sample_size=8),
        "tiny_clip": (16,),
    },
}
ALIASES = {"sd3-medium-1024": "sd3-medium"}
CLASSES = [207, 360, 387, 974]
WORDS = ("a photo of the an in on with and red blue green yellow black white small large old new cat dog bird "
         "horse car boat house tree flower mountain river city street beach forest sky night sunset painting "
         "portrait close up view at watercolor oil sketch under snow rain light dark bright").split()
PROMPTS = ["a photo of a red cat in the snow on a bright night", "a watercolor painting of an old boat at sunset",
           "a sketch of a small house under a dark sky", "an oil painting of a large horse in a green forest"]
STAND_INS = ("text encoders: one-layer T5 / CLIP of the real output widths and token budgets with word-level "
             "tokenizers; VAE: 8x AutoencoderKL with 8-channel blocks and the real latent channels / scaling / shift; "
             "random weights everywhere")


# ---- building the pipeline directory -----------------------------------------------------------------------------
def _randomize_zeros(model, std: float = 0.02, seed: int = 0):
    """diffusers zero-initialises adaLN-Zero gates and output layers (the model would output zeros): draw those."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _t5(width: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    return T5EncoderModel(T5Config(vocab_size=len(WORDS) + 40, d_model=width, d_kv=8, d_ff=16, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)).eval()


def _clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz")):
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _clip(width: int, projection: bool, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=64, hidden_size=width, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=width, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    kw = {} if shift_factor is None else {"shift_factor": shift_factor}
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                         mid_block_add_attention=False, scaling_factor=scaling_factor, **kw).eval()


def transformer_config(name: str, blocks: int | None, tiny: bool) -> dict:
    """The published transformer config of ``name``, depth-reduced to ``blocks`` and (tests) shrunk by ``tiny``."""
    spec = CONFIGS[name]
    cfg = dict(spec["config"])
    if tiny:
        cfg.update(spec["tiny"])
    if blocks is not None:
        if blocks < 1:
            raise QcacheError(f"--blocks: must be >= 1, got {blocks}")
        cfg["num_layers"] = min(blocks, spec["config"]["num_layers"])
        if "num_single_layers" in cfg:
            cfg["num_single_layers"] = min(2 * blocks, spec["config"]["num_single_layers"])
    return cfg


def build_pipeline(name: str, root: Path, blocks: int | None = None, tiny: bool = False) -> dict:
    """Write a diffusers pipeline directory for ``name`` at ``root``; returns facts about the transformer."""
    import diffusers
    import torch

    spec = CONFIGS[name]
    cfg = transformer_config(name, blocks, tiny)
    sample_size = cfg.pop("sample_size", None) if spec["transformer"] == "FluxTransformer2DModel" else None
    torch.manual_seed(0)
    tr = _randomize_zeros(getattr(diffusers, spec["transformer"])(**cfg))
    if sample_size is not None:  # FLUX has no fixed resolution; the family reads sample_size when it is there
        tr.register_to_config(sample_size=sample_size)
    params = sum(p.numel() for p in tr.parameters())
    sched_cls, sched_cfg = spec["scheduler"]
    parts = {"transformer": tr, "scheduler": getattr(diffusers, sched_cls)(**sched_cfg), "vae": _vae(**spec["vae"])}
    clip = spec.get("tiny_clip") if tiny else spec.get("clip")
    if "t5" in spec:
        t5_width = cfg[spec["t5"]]
    if spec["pipeline"] == "PixArtAlphaPipeline":
        parts.update(tokenizer=_t5_tokenizer(), text_encoder=_t5(t5_width))
    elif spec["pipeline"] == "StableDiffusion3Pipeline":
        parts.update(text_encoder=_clip(clip[0], True, 3), tokenizer=_clip_tokenizer(),
                     text_encoder_2=_clip(clip[1], True, 4), tokenizer_2=_clip_tokenizer(),
                     text_encoder_3=_t5(t5_width), tokenizer_3=_t5_tokenizer())
    elif spec["pipeline"] == "FluxPipeline":
        parts.update(text_encoder=_clip(clip[0], False, 3), tokenizer=_clip_tokenizer(),
                     text_encoder_2=_t5(t5_width), tokenizer_2=_t5_tokenizer())
    getattr(diffusers, spec["pipeline"])(**parts).save_pretrained(root)
    depth = {k: cfg[k] for k in ("num_layers", "num_single_layers") if k in cfg}
    return {"params": params, **depth}


def dry_recipe(name: str, pipe: Path, work: Path, steps: int, images: int, device: str) -> dict:
    """The shipped recipe of ``name`` with the local pipeline as source and tiny settings."""
    import yaml

    spec = CONFIGS[name]
    r = yaml.safe_load((REPO / "recipes" / spec["recipe"]).read_text())
    cuda = device.startswith("cuda") or (device == "auto" and _cuda())
    r["model"] = {"source": str(pipe), "device": device, "dtype": r["model"]["dtype"] if cuda else "float32"}
    r["sampling"].update(steps=steps, batch_size=images, seed=0)
    if "classes" in r.get("condition", {}):
        r["condition"]["classes"] = CLASSES[:images]
    else:
        from qcache.families.text import save_prompts

        r["condition"]["prompts"] = str(save_prompts(PROMPTS[:images], work / "prompts"))
    r["eval"] = {"n": images, "latency_repeats": 1, "latency_samples": images}
    r["output"] = {"dir": str(work / "out")}
    warmup = 1
    r["cache"].update(rcs=False, warmup=warmup, target_nfc=max(warmup, steps // 2), tune_samples=images)
    r["cache"].pop("tau", None)
    cal = r["calibration"]
    cal.update(pool_images=images, size=2 * images, clusters=images)
    for key in ("pool_path", "selection_path"):  # the recipe's runs/... copies: not for a dry run
        cal.pop(key, None)
    r["vc"].update(samples=images, holdout_samples=images)
    return r


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---- the child: compress and measure -----------------------------------------------------------------------------
def child(work: Path) -> None:
    """Compress the recipe at ``work/recipe.json``, measure the cache state of one generation, write child.json."""
    import torch

    from qcache.compress import compress
    from qcache.recipe import recipe_from_dict

    torch.set_grad_enabled(False)
    recipe = recipe_from_dict(json.loads((work / "recipe.json").read_text()))
    t0 = time.perf_counter()
    res = compress(recipe, work / "out", progress=False, log=lambda m: print(m, file=sys.stderr, flush=True))
    compress_s = time.perf_counter() - t0
    report = res.report
    per_image = report.get("compressed", {}).get("cache_bytes_per_image")
    source = "report"
    if per_image is None:  # measured: one generation of the compressed model with its static schedule
        source = "measured"
        with res.compressed.sampler("static") as s:
            cache = next(h for h in s.hooks if hasattr(h, "stats"))
            s.sample(recipe.eval.n, seed=0, progress=False)
            per_image = cache.stats.bytes_per_image()
    artifact = sum(f.stat().st_size for f in Path(res.artifact).rglob("*") if f.is_file())
    out = {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "cache_bytes_per_image": per_image, "cache_bytes_source": source, "artifact_bytes": artifact,
        "stage_seconds": {k: v["seconds"] for k, v in report["stages"].items()},
        "compress_seconds": round(compress_s, 1), "nfc": report["compressed"]["nfc"],
        "psnr": report["compressed"]["psnr"], "device": report["setup"]["device"],
        "threads": report["setup"]["threads"], "dtype": recipe.model.dtype, "quant": recipe.quant.preset,
    }
    (work / "child.json").write_text(json.dumps(out, indent=2) + "\n")


def _run_child(work: Path, mode: str, log_name: str, what: str) -> None:
    """``tools/dry_run.py --MODE WORK`` in a fresh process (its memory is its own), logging to ``work/log_name``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--{mode}", str(work)]
    with open(work / log_name, "w") as log_file:  # the stage lines as they come
        proc = subprocess.run(cmd, cwd=str(REPO), stdout=log_file, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        lines = (work / log_name).read_text(errors="replace").strip().splitlines()
        tail = [ln for ln in lines if ln.strip()][-1:] or ["no output"]
        raise QcacheError(f"{what}: {tail[0]} (log: {work / log_name})")


def build_child(work: Path) -> None:
    """Build the pipeline described by ``work/build.json``; write its facts to ``work/built.json``."""
    a = json.loads((work / "build.json").read_text())
    t0 = time.perf_counter()
    facts = build_pipeline(a["name"], work / "pipeline", a["blocks"], a["tiny"])
    facts["build_seconds"] = round(time.perf_counter() - t0, 1)
    (work / "built.json").write_text(json.dumps(facts) + "\n")


def dry_run(name: str, blocks: int | None = None, steps: int = 4, images: int = 2, work: Path | None = None,
            tiny: bool = False, device: str = "auto", keep: bool = False, log=print) -> dict:
    """Build, compress in a child process, and return the figures (see the module docstring)."""
    name = ALIASES.get(name, name)
    if name not in CONFIGS:
        raise QcacheError(f"--config: must be one of {', '.join(CONFIGS)}, got {name!r}")
    if steps < 2:
        raise QcacheError(f"--steps: must be >= 2 (one full step, one cached), got {steps}")
    if images < 2:
        raise QcacheError(f"--images: must be >= 2 (evaluation needs two), got {images}")
    own = work is None
    work = Path(tempfile.mkdtemp(prefix=f"dry-{name}-")) if own else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        (work / "build.json").write_text(json.dumps({"name": name, "blocks": blocks, "tiny": tiny}) + "\n")
        _run_child(work, "build-child", "build.log", f"build: the random {name} pipeline could not be built")
        facts = json.loads((work / "built.json").read_text())
        build_s = facts.pop("build_seconds")
        log(f"built {name}: {facts['params'] / 1e6:.1f}M parameters, {facts} ({build_s:.0f}s)")
        recipe = dry_recipe(name, work / "pipeline", work, steps, images, device)
        (work / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        _run_child(work, "child", "child.log", f"compress: the dry run of {name} failed")
        res = json.loads((work / "child.json").read_text())
        total = time.perf_counter() - t0
        res["stage_seconds"].update(build=round(build_s, 1), compress=res.pop("compress_seconds"),
                                    total=round(total, 1))
        out = {"config": name, "blocks": blocks, "tiny": tiny, **facts, "steps": steps, "images": images, **res,
               "stand_ins": STAND_INS}
        return out
    finally:
        if own and not keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python tools/dry_run.py", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help=f"one of {', '.join(CONFIGS)}")
    ap.add_argument("--blocks", type=int, default=None, help="transformer depth (FLUX: K double + 2K single blocks)")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    ap.add_argument("--images", type=int, default=2, help="images per stage (default 2)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one, removed after)")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    ap.add_argument("--tiny", action="store_true", help="tests only: tiny widths and resolution (not a real size)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--build-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child))
        return
    if args.build_child:
        build_child(Path(args.build_child))
        return
    if not args.config:
        raise QcacheError(f"--config: required, one of {', '.join(CONFIGS)}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise QcacheError(f"--json: directory not found: {Path(args.json).parent}")
    out = dry_run(args.config, args.blocks, args.steps, args.images, Path(args.work) if args.work else None,
                  args.tiny, args.device, log=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(out, indent=2) + "\n"
    if args.json:
        tmp = Path(args.json).with_suffix(".json.partial")
        tmp.write_text(text)
        os.replace(tmp, args.json)
    print(text, end="")


if __name__ == "__main__":
    run_cli(main)
