"""Model families end to end on tiny random-weight pipelines of the real diffusers classes (no downloads).

For DiT (latent, learned sigma, 1000 classes + VAE), PixArt-α (T5 text encoder with masks + VAE), SD3 (joint
blocks, CLIP + T5, flow matching) and FLUX.1 (double/single-stream blocks, packed latents, embedded guidance or true
CFG, dynamic shift): compress -> save -> load -> generate, bit-identical between the in-memory and the loaded model,
images decoded by the VAE; plus the adapter pieces (cache layout, joint-attention packing, quant plan, pool rows,
one-line errors) and FLUX's sampler against ``FluxPipeline`` itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

import qcache
from qcache.cache import attach_cache, cache_layout
from qcache.compress import compress
from qcache.errors import QcacheError
from qcache.families import ClassConditioner, PromptConditioner, family_for
from qcache.families.flux import SingleBlockIO, pack_latents, unpack_latents
from qcache.families.sd3 import JOINT_IO
from qcache.families.text import save_prompts
from qcache.models import load_model, load_parts
from qcache.quant import plan_quantization
from qcache.recipe import CacheConfig, ConditionConfig, ModelConfig, QuantConfig, SamplingConfig, recipe_from_dict
from qcache.sampling import Sampler
from tests.tiny_pipelines import dit_pipeline, flux_pipeline, pixart_pipeline, prompts, sd3_pipeline

CLASSES = [207, 360, 387, 974]  # ImageNet ids (golden retriever, otter, lesser panda, geyser)
BUILD = {"dit": dit_pipeline, "pixart": pixart_pipeline, "sd3": sd3_pipeline, "flux": flux_pipeline,
         "flux-cfg": lambda root: flux_pipeline(root, guidance_embeds=False)}
SCHEDULER = {"dit": "ddim", "pixart": "ddim", "sd3": "flow-euler", "flux": "flow-euler", "flux-cfg": "flow-euler"}
PIPELINE_CLASS = {"dit": "DiTPipeline", "pixart": "PixArtAlphaPipeline", "sd3": "StableDiffusion3Pipeline",
                  "flux": "FluxPipeline"}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    out = {name: build(root / name) for name, build in BUILD.items()}
    out["prompts"] = save_prompts(prompts(6), root / "prompts")
    return out


def condition(fam: str, pipes: dict) -> dict:
    return {"classes": CLASSES} if fam == "dit" else {"prompts": str(pipes["prompts"]), "max_sequence_length": 16}


def recipe(fam: str, pipes: dict, out: Path) -> dict:
    return {
        "model": {"source": str(pipes[fam]), "device": "cpu"},
        "sampling": {"scheduler": SCHEDULER[fam], "steps": 8, "guidance_scale": 4.0, "seed": 0, "batch_size": 64},
        "condition": condition(fam, pipes),
        "eval": {"n": 6, "latency_repeats": 1, "latency_samples": 2},
        "output": {"dir": str(out)},
        "cache": {"policy": "rfc", "target_nfc": 4, "warmup": 2, "tune_samples": 4},
        "calibration": {"pool_images": 4, "size": 12, "clusters": 4},
        "quant": {"preset": "W8A8"},
        "vc": {"samples": 4},
    }


def sampler_for(fam: str, pipes: dict, **sampling) -> Sampler:
    loaded = load_model(ModelConfig(source=str(pipes[fam]), device="cpu"))
    parts = load_parts(loaded, ConditionConfig(**condition(fam, pipes)))
    cfg = SamplingConfig(**{"scheduler": SCHEDULER[fam], "steps": 6, "batch_size": 8, "guidance_scale": 4.0,
                            **sampling})
    return Sampler(loaded.transformer, loaded.scheduler_config, cfg, conditioner=parts.conditioner)


# ---- end to end: compress -> save -> load -> generate ------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(pipes, tmp_path_factory) -> dict:
    return {}


def compressed(fam: str, pipes: dict, runs: dict, tmp_path_factory):
    if fam not in runs:
        out = tmp_path_factory.mktemp(f"run-{fam}") / "out"
        runs[fam] = compress(recipe_from_dict(recipe(fam, pipes, out)), out, progress=False, log=lambda m: None)
    return runs[fam]


@pytest.mark.parametrize("fam", ["dit", "pixart", "sd3", "flux"])
def test_compress_save_load_generate(fam, pipes, runs, tmp_path_factory):
    res = compressed(fam, pipes, runs, tmp_path_factory)
    report = json.loads((res.out / "report.json").read_text())
    fp, c = report["full_precision"], report["compressed"]
    assert report["setup"]["family"] == fam and report["setup"]["decoded_by_vae"] is True
    assert c["nfc"] == len(report["schedule"]["full_steps"]) and 3 <= c["nfc"] <= 5 < fp["nfc"] == 8
    for key in ("class_accuracy", "fid_data", "fid_to_fp"):  # no judge / feature network for these images
        assert fp[key] is None and c[key] is None, key
    assert fp["psnr"] == 100.0 and 10.0 < c["psnr"] < 100.0 and 0.0 < c["ssim"] < 1.0
    assert c["size_ratio"] > 1.3 and c["flops_ratio"] > 1.2
    manifest = json.loads((res.artifact / "manifest.json").read_text())
    assert manifest["family"] == fam and manifest["vae"] is True
    assert manifest["pipeline_class"] == PIPELINE_CLASS[fam]
    assert ("prompts.json" in manifest["files"]) == (fam != "dit")
    assert not any(k.startswith(("vae/", "text_encoder")) for k in manifest["files"])  # transformer only

    loaded = qcache.load(res.out)
    assert loaded.family == fam and loaded.nfc == res.compressed.nfc
    for mode in ("static", "live"):
        a = res.compressed.generate(3, seed=5, mode=mode)
        b = loaded.generate(3, seed=5, mode=mode)
        assert torch.equal(a.images, b.images), mode
    assert a.images.shape == (3, 3, 16, 16)  # decoded by the VAE: RGB at twice the latent size
    assert a.images.abs().max() <= 1.0 and a.images.std() > 0.01
    latents = loaded.generate(3, seed=5, decode=False).images
    assert latents.shape == (3, 4, 8, 8)
    assert not torch.equal(loaded.generate(3, seed=6).images, b.images)
    assert not any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks
                   for m in loaded.transformer.modules())


def test_pool_rows_carry_the_condition_ids_and_timesteps(pipes, runs, tmp_path_factory):
    dit = load_from_disk(str(compressed("dit", pipes, runs, tmp_path_factory).out / "stages/pool/pool"))
    assert set(dit["class_label"]) <= set(CLASSES) and dit.features["timestep"].dtype == "int64"
    sd3 = load_from_disk(str(compressed("sd3", pipes, runs, tmp_path_factory).out / "stages/pool/pool"))
    assert "prompt_index" in sd3.column_names and "class_label" not in sd3.column_names
    assert set(sd3["prompt_index"]) <= set(range(6))
    assert sd3.features["timestep"].dtype == "float32"  # flow-matching timesteps are not integers
    assert any(t != int(t) for t in sd3["timestep"])


def test_text_models_generate_from_new_prompts(pipes, runs, tmp_path_factory):
    model = qcache.load(compressed("pixart", pipes, runs, tmp_path_factory).out)
    assert model.parts.conditioner.prompts == prompts(6)
    cat = model.generate(2, seed=1, prompts=["a photo of a red cat"])
    dog = model.generate(2, seed=1, prompts=["a photo of a red dog"])
    again = model.generate(2, seed=1, prompts=["a photo of a red cat"])
    assert torch.equal(cat.images, again.images) and not torch.equal(cat.images, dog.images)
    stored = model.generate(2, seed=1, labels=torch.tensor([0, 0]))  # index 0 of the stored prompt list
    assert torch.equal(stored.images, model.generate(2, seed=1, prompts=[prompts(6)[0]]).images)
    with pytest.raises(QcacheError, match="prompts: the prompt list is empty"):
        model.generate(1, prompts=[])


# ---- adapter pieces ------------------------------------------------------------------------------------------------
def test_cache_layouts_per_family(pipes):
    sd3 = load_model(ModelConfig(source=str(pipes["sd3"]), device="cpu")).transformer
    lay = cache_layout(sd3)
    assert lay.names == ("transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
                         "transformer_blocks.1.attn", "transformer_blocks.1.ff")  # the last block has no ff_context
    assert lay.watched == "transformer_blocks.0.attn" and lay.io_of("transformer_blocks.0.attn") is JOINT_IO
    assert lay.blocks == ("transformer_blocks.0", "transformer_blocks.1")
    pixart = load_model(ModelConfig(source=str(pipes["pixart"]), device="cpu")).transformer
    assert cache_layout(pixart).names[:3] == ("transformer_blocks.0.attn1", "transformer_blocks.0.attn2",
                                              "transformer_blocks.0.ff")
    assert cache_layout(pixart).blocks == ("transformer_blocks.0", "transformer_blocks.1")
    flux = load_model(ModelConfig(source=str(pipes["flux"]), device="cpu")).transformer
    lay = cache_layout(flux)
    assert lay.names == ("transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
                         "single_transformer_blocks.0", "single_transformer_blocks.1")
    assert lay.blocks == ("transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1")
    assert lay.watched == "transformer_blocks.0.attn" and lay.io_of("transformer_blocks.0.attn") is JOINT_IO
    ios = [lay.io_of(f"single_transformer_blocks.{j}") for j in (0, 1)]
    assert all(isinstance(io, SingleBlockIO) for io in ios) and ios[0] is not ios[1]  # one per block: it keeps state
    for name in lay.names + lay.blocks:
        flux.get_submodule(name)  # every name is a real module


def test_flux_single_block_io_caches_the_residual(pipes):
    """The single block's cached quantity is output - input over (text, image) tokens; unpack adds it back."""
    flux = load_model(ModelConfig(source=str(pipes["flux"]), device="cpu")).transformer
    block = flux.single_transformer_blocks[0]
    g = torch.Generator().manual_seed(0)
    kwargs = {"hidden_states": torch.randn(2, 16, 16, generator=g), "encoder_hidden_states": torch.randn(2, 5, 16,
              generator=g), "temb": torch.randn(2, 16, generator=g), "image_rotary_emb": None}
    io = SingleBlockIO()
    inp = io.input((), kwargs)
    assert torch.equal(inp, torch.cat([kwargs["encoder_hidden_states"], kwargs["hidden_states"]], 1))
    with torch.no_grad():
        out = block(**kwargs)
    res = io.pack(out)
    assert res.shape == (2, 21, 16) and torch.equal(res, torch.cat(out, 1) - inp)
    with pytest.raises(QcacheError, match="packed without its input"):
        io.pack(out)  # the input of a call is used once
    io.input((), kwargs)
    c, h = io.unpack(res, (), kwargs)
    torch.testing.assert_close(c, out[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(h, out[1], rtol=0, atol=1e-6)
    x = torch.randn(3, 4, 8, 6, generator=g)
    assert pack_latents(x).shape == (3, 12, 16) and torch.equal(unpack_latents(pack_latents(x), 8, 6), x)


@pytest.mark.parametrize("fam", ["flux", "flux-cfg"])
def test_flux_sampler_matches_flux_pipeline(fam, pipes):
    """The same noise through qcache's sampler and diffusers' FluxPipeline (packed latents, txt/img ids, sigmas
    linspace(1, 1/N, N) with the dynamic shift, embedded guidance or true CFG with the negative prompt)."""
    from diffusers import FluxPipeline

    from qcache.sampling import make_noise

    s = sampler_for(fam, pipes, steps=4, guidance_scale=3.5)
    assert s.embedded_guidance == (fam == "flux") and s.cfg_batch == (fam == "flux-cfg")
    seen = []
    h = s.transformer.register_forward_hook(lambda m, a, kw, out: seen.append(kw), with_kwargs=True)
    ours = s.sample(2, seed=3, progress=False, labels=torch.tensor([0, 1])).images
    h.remove()
    kw = seen[0]
    rows = 2 if fam == "flux" else 4  # true CFG: the negative prompt's rows in the same call
    assert kw["hidden_states"].shape == (rows, 16, 16) and kw["img_ids"].shape == (16, 3)
    assert kw["encoder_hidden_states"].shape == (rows, 16, 32) and kw["pooled_projections"].shape == (rows, 16)
    assert torch.equal(kw["txt_ids"], torch.zeros(16, 3))
    if fam == "flux":
        assert torch.equal(kw["guidance"], torch.full((2,), 3.5))
    else:
        assert kw["guidance"] is None
        assert torch.equal(kw["encoder_hidden_states"][2:], s.conditioner.negative.embeds.expand(2, -1, -1))
    pipe = FluxPipeline.from_pretrained(str(pipes[fam]), transformer=s.transformer)
    extra = {"guidance_scale": 3.5} if fam == "flux" else {"true_cfg_scale": 3.5, "negative_prompt": ""}
    ref = pipe(prompts(2), latents=pack_latents(make_noise(2, (4, 8, 8), 3)), height=16, width=16,
               num_inference_steps=4, max_sequence_length=16, output_type="latent", **extra).images
    torch.testing.assert_close(unpack_latents(ref, 8, 8), ours, atol=1e-5, rtol=0)


def test_flux_timesteps_shift_with_the_resolution(pipes):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from qcache.families import family_by_name

    flux = load_model(ModelConfig(source=str(pipes["flux"]), device="cpu"))
    fam = family_by_name("flux")
    assert fam.sample_shape(flux.transformer) == (4, 8, 8)
    small = fam.timestep_kwargs(flux.scheduler_config, (16, 8, 8), flux.transformer, steps=4)
    big = fam.timestep_kwargs(flux.scheduler_config, (16, 128, 128), flux.transformer, steps=28)
    assert small["mu"] == calculate_shift(16) and big["mu"] == pytest.approx(1.15)  # 4096 tokens at 1024 px
    assert list(small["sigmas"]) == [1.0, 0.75, 0.5, 0.25] and len(big["sigmas"]) == 28
    shifted = {}
    for name, kw in (("small", small), ("big", big)):
        from qcache.sampling import make_scheduler

        sch = make_scheduler("flow-euler", flux.scheduler_config)
        sch.set_timesteps(len(kw["sigmas"]), **kw)
        shifted[name] = sch.sigmas
    assert shifted["big"][1] > shifted["small"][1] > 0.75  # more tokens, more shift toward high noise


def test_joint_attention_packing_round_trips():
    h, c = torch.randn(2, 16, 8), torch.randn(2, 5, 8)
    kwargs = {"hidden_states": h, "encoder_hidden_states": c}
    packed = JOINT_IO.pack((h * 2, c * 3))
    assert packed.shape == (2, 21, 8) and torch.equal(JOINT_IO.input((), kwargs), torch.cat([h, c], 1))
    a, b = JOINT_IO.unpack(packed, (), kwargs)
    assert torch.equal(a, h * 2) and torch.equal(b, c * 3)
    assert torch.equal(JOINT_IO.unpack(h, (), {"hidden_states": h}), h)  # SD3.5's attn2: image tokens only


@pytest.mark.parametrize("fam", ["pixart", "sd3", "flux", "flux-cfg"])
def test_every_step_full_is_bit_identical_and_caching_changes_the_output(fam, pipes):
    s = sampler_for(fam, pipes)
    ref = s.sample(3, seed=2, progress=False).images
    every, fixed = CacheConfig(policy="rfc", tau=0.0), CacheConfig(policy="rfc", rcs=False, interval=3)
    for cfg, same in ((every, True), (fixed, False)):
        cache = attach_cache(s.transformer, cfg, tau=cfg.tau)
        try:
            with s.extra_hooks(cache):
                out = s.sample(3, seed=2, progress=False).images
        finally:
            cache.remove()
        assert torch.equal(out, ref) == same, cfg
        assert cache.stats.mean_nfc() == (6 if same else 3)


def test_pixart_fast_path_is_bit_identical_to_the_module_hooks(pipes):
    """PixArt's adaLN-single blocks (attn1, cross-attention attn2, ff) through the lean cached-step path."""
    s = sampler_for("pixart", pipes)
    outs = {}
    for fast in (False, True):
        cache = attach_cache(s.transformer, CacheConfig(policy="rfc", rcs=False, interval=3, fast_path=fast))
        try:
            with s.extra_hooks(cache):
                outs[fast] = s.sample(3, seed=2, progress=False).images
        finally:
            cache.remove()
        assert bool(cache._fast_blocks) == fast and cache.stats.mean_nfc() == 3
    assert torch.equal(outs[True], outs[False])


def test_text_conditioning_reaches_the_model_with_cfg(pipes):
    s = sampler_for("pixart", pipes)
    seen = []
    h = s.transformer.register_forward_hook(lambda m, a, kw, out: seen.append(kw), with_kwargs=True)
    s.sample(2, progress=False, labels=torch.tensor([1, 4]))
    h.remove()
    kw = seen[0]
    cond = s.conditioner
    assert isinstance(cond, PromptConditioner) and kw["encoder_hidden_states"].shape == (4, 16, 32)
    assert torch.equal(kw["encoder_hidden_states"][:2], cond.bank.embeds[[1, 4]])
    assert torch.equal(kw["encoder_hidden_states"][2:], cond.negative.embeds.expand(2, -1, -1))
    assert torch.equal(kw["encoder_attention_mask"][:2], cond.bank.mask[[1, 4]])
    assert kw["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}


def test_dit_uses_null_class_1000_and_the_recipe_classes(pipes):
    s = sampler_for("dit", pipes)
    assert isinstance(s.conditioner, ClassConditioner) and s.conditioner.null_class == 1000
    seen = []
    h = s.transformer.register_forward_hook(lambda m, a, kw, out: seen.append(kw["class_labels"]), with_kwargs=True)
    out = s.sample(5, progress=False)
    h.remove()
    assert out.labels.tolist() == [207, 360, 387, 974, 207]
    assert seen[0].tolist() == [207, 360, 387, 974, 207] + [1000] * 5
    with pytest.raises(QcacheError, match=r"condition.classes: class ids must be in \[0, 999\]"):
        load_parts(load_model(ModelConfig(source=str(pipes["dit"]), device="cpu")), ConditionConfig(classes=[1000]))


def test_quant_plans_keep_conditioning_and_io_layers(pipes):
    flux = load_model(ModelConfig(source=str(pipes["flux"]), device="cpu")).transformer
    plan = plan_quantization(flux, QuantConfig(preset="W8A8"))
    for name in ("x_embedder", "proj_out", "norm_out.linear"):
        assert name not in plan, name
    for name in ("context_embedder", "time_text_embed.timestep_embedder.linear_1",
                 "time_text_embed.guidance_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
                 "transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                 "single_transformer_blocks.1.norm.linear"):
        assert plan[name] == {"weights": "int8", "activations": "none"}, name
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                 "transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.0.proj",
                 "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out",
                 "single_transformer_blocks.0.attn.to_v"):
        assert plan[name] == {"weights": "int8", "activations": "int8"}, name
    sd3 = load_model(ModelConfig(source=str(pipes["sd3"]), device="cpu")).transformer
    plan = plan_quantization(sd3, QuantConfig(preset="W8A8"))
    assert "pos_embed.proj" not in plan and "proj_out" not in plan
    for name in ("context_embedder", "time_text_embed.timestep_embedder.linear_1", "transformer_blocks.0.norm1.linear",
                 "transformer_blocks.0.norm1_context.linear", "norm_out.linear"):
        assert plan[name] == {"weights": "int8", "activations": "none"}, name
    assert plan["transformer_blocks.0.attn.add_q_proj"] == {"weights": "int8", "activations": "int8"}
    pixart = load_model(ModelConfig(source=str(pipes["pixart"]), device="cpu")).transformer
    plan = plan_quantization(pixart, QuantConfig(preset="W8A8"))
    assert plan["adaln_single.linear"]["activations"] == "none"
    assert plan["caption_projection.linear_1"]["activations"] == "none"
    assert plan["transformer_blocks.0.attn2.to_k"] == {"weights": "int8", "activations": "int8"}


def test_bad_family_inputs_fail_in_one_line(pipes, tmp_path):
    with pytest.raises(QcacheError, match=r"^sampling.scheduler: SD3Transformer2DModel \(sd3\) samples with "
                                          r"flow-euler, got 'ddim'$"):
        sampler_for("sd3", pipes, scheduler="ddim")
    with pytest.raises(QcacheError, match=r"^sampling.scheduler: FluxTransformer2DModel \(flux\) samples with "):
        sampler_for("flux", pipes, scheduler="ddpm")
    with pytest.raises(QcacheError, match=r"^condition.max_sequence_length: FLUX's T5 budget is at most 512"):
        load_parts(load_model(ModelConfig(source=str(pipes["flux"]), device="cpu")),
                   ConditionConfig(prompts=str(pipes["prompts"]), max_sequence_length=600))
    import shutil

    no_t5 = shutil.copytree(pipes["flux"], tmp_path / "flux-no-t5", ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(QcacheError, match=r"^model.source: .*flux-no-t5 has no text_encoder_2/ folder \(FluxPipeline "
                                          r"encodes prompts with text_encoder, tokenizer, text_encoder_2, "
                                          r"tokenizer_2\)$"):
        load_parts(load_model(ModelConfig(source=str(no_t5), device="cpu")),
                   ConditionConfig(prompts=str(pipes["prompts"])))
    pixart = load_model(ModelConfig(source=str(pipes["pixart"]), device="cpu"))
    with pytest.raises(QcacheError, match=r"^condition.prompts: PixArtTransformer2DModel is text-conditional"):
        load_parts(pixart)
    with pytest.raises(QcacheError, match=r"^condition.prompts: no prompt dataset at"):
        load_parts(pixart, ConditionConfig(prompts=str(tmp_path / "none")))
    dit = load_model(ModelConfig(source=str(pipes["dit"]), device="cpu"))
    with pytest.raises(QcacheError, match=r"^condition.prompts: DiTTransformer2DModel is class-conditional"):
        load_parts(dit, ConditionConfig(prompts=str(pipes["prompts"])))
    bare = load_model(ModelConfig(source=str(pipes["pixart"] / "transformer"), device="cpu"))
    with pytest.raises(QcacheError, match=r"^model.source: .* no vae/ folder"):
        load_parts(bare, ConditionConfig(prompts=str(pipes["prompts"])))
    with pytest.raises(QcacheError, match=r"^model: model class 'Linear' is not supported yet"):
        family_for(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["dit-xl-2-256", "pixart-alpha-512", "sd3-medium", "flux-dev-1024"])
def test_shipped_recipes_validate_and_their_prompts_load(name):
    from qcache.families.text import read_prompts
    from qcache.recipe import load_recipe
    from tests.conftest import REPO

    r = load_recipe(REPO / "recipes" / f"{name}.yaml")
    if name.startswith("dit"):
        assert r.model.source == "facebook/DiT-XL-2-256" and r.sampling.steps == 50 and r.sampling.guidance_scale == 4.0
        assert len(set(r.condition.classes)) == len(r.condition.classes) >= 32 and max(r.condition.classes) < 1000
    else:
        ps = read_prompts(r.condition.prompts)
        assert len(ps) == len(set(ps)) == 64 and all(len(p.split()) >= 4 for p in ps)
        assert r.sampling.scheduler == ("dpmsolver++" if name.startswith("pixart") else "flow-euler")
    if name.startswith("flux"):
        assert r.model.source == "black-forest-labs/FLUX.1-dev" and r.model.dtype == "bfloat16"
        assert r.sampling.steps == 28 and r.sampling.guidance_scale == 3.5 and r.condition.max_sequence_length == 512


@pytest.mark.parametrize("fam", ["dit", "pixart", "sd3", "flux"])
def test_diffusers_pipeline_with_the_compressed_transformer_matches_generate(fam, pipes, runs, tmp_path_factory):
    import numpy as np

    from qcache.export import CompressedScheduler
    from qcache.sampling import make_noise

    model = qcache.load(compressed(fam, pipes, runs, tmp_path_factory).out)
    ids = torch.tensor([207, 360]) if fam == "dit" else torch.tensor([0, 1])
    ref = model.generate(2, labels=ids, seed=3).images
    pipe = model.pipeline()
    assert type(pipe).__name__ == model.info["manifest"]["pipeline_class"]
    assert pipe.transformer is model.transformer and isinstance(pipe.scheduler, CompressedScheduler)
    common = dict(num_inference_steps=8, guidance_scale=4.0, output_type="np")
    if fam == "dit":
        out = pipe(ids.tolist(), generator=torch.Generator().manual_seed(3), **common).images
    else:
        extra = {"use_resolution_binning": False, "clean_caption": False} if fam == "pixart" else {}
        noise = make_noise(2, (4, 8, 8), 3)
        out = pipe(prompts(2), latents=pack_latents(noise) if fam == "flux" else noise, height=16, width=16,
                   max_sequence_length=16, **common, **extra).images
    images = torch.from_numpy(np.asarray(out)).permute(0, 3, 1, 2) * 2 - 1
    torch.testing.assert_close(images, ref, atol=1e-4, rtol=0)  # same cache schedule, VC and decoding
    assert pipe.qcache_cache.stats.nfc_per_generation() == [model.nfc] and pipe.scheduler.step_count == 8
    with pytest.raises(QcacheError, match="num_inference_steps: .* for 8 steps, got 5"):
        pipe.scheduler.set_timesteps(5)
    pipe.qcache_cache.remove()


def test_generate_cli_takes_prompts_for_text_models(pipes, runs, tmp_path_factory, tmp_path):
    from PIL import Image
    from safetensors.torch import load_file

    from tests.conftest import run_module

    res = compressed("pixart", pipes, runs, tmp_path_factory)
    png, raw = tmp_path / "g.png", tmp_path / "g.safetensors"
    cli = run_module("qcache.generate", str(res.artifact), "--prompt", "a photo of a red cat", "--prompt",
                     "a sketch of a dog", "--n", "2", "--scale", "1", "--out", str(png), "--samples", str(raw))
    assert cli.returncode == 0, cli.stderr
    assert Image.open(png).size == (2 * 16 + 3, 16 + 2)  # two 16x16 RGB images side by side
    expected = res.compressed.generate(2, seed=0, prompts=["a photo of a red cat", "a sketch of a dog"])
    assert torch.equal(load_file(str(raw))["images"], expected.images)
    bad = run_module("qcache.generate", str(res.artifact), "--class", "3", "--out", str(tmp_path / "b.png"))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == ("error: --class: PixArtTransformer2DModel is text-conditional; "
                                                   "use --prompt")


# ---- conditioning once per distinct condition (families/dedup.py) -------------------------------------------------
def test_row_groups_follow_first_appearance():
    from qcache.families.dedup import RowGroups, equal_rows

    g = RowGroups.from_keys(torch.tensor([7, 3, 7, 10, 3, 10]))
    assert g.first.tolist() == [0, 1, 3] and g.inverse.tolist() == [0, 1, 0, 2, 1, 2]
    assert RowGroups.from_keys(torch.tensor([1, 2, 3])) is None  # all distinct: nothing to share
    emb = torch.randn(3, 5, 4)
    rows = torch.cat([emb, torch.randn(1, 5, 4).expand(3, -1, -1)])  # CFG: 3 prompts, then the null one 3 times
    mask = torch.ones(6, 5, dtype=torch.long)
    g = equal_rows(rows, mask, None)
    assert g.first.tolist() == [0, 1, 2, 3] and g.inverse.tolist() == [0, 1, 2, 3, 3, 3]
    mask[4, 2] = 0  # one null row with another mask is its own group
    assert equal_rows(rows, mask).inverse.tolist() == [0, 1, 2, 3, 4, 3]
    assert equal_rows(emb) is None


@pytest.mark.parametrize("fam,groups", [("dit", 4), ("pixart", 4), ("sd3", 4), ("flux", 3), ("flux-cfg", 4)])
def test_conditioning_runs_once_per_distinct_condition(fam, groups, pipes, monkeypatch):
    """3 images with CFG = 6 rows of 3 conditions + the null one: the embedders inside the conditioning modules see
    4 rows (FLUX.1-dev: no CFG batch, 3 distinct rows, nothing shared); the samples equal those computed on every
    row up to float rounding, and the hooks are gone after sampling."""
    from qcache.families.dedup import HOOK_NAME, row_conditioning_modules

    s = sampler_for(fam, pipes)
    mods = row_conditioning_modules(s.transformer, s.family.row_conditioning)
    inner = [c for m in mods for c in m.modules() if c is not m and isinstance(c, torch.nn.Linear)]
    assert mods and inner
    seen: list[int] = []
    handles = [c.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0])) for c in inner]
    try:
        out = s.sample(3, seed=2, progress=False).images
    finally:
        for h in handles:
            h.remove()
    assert set(seen) == {groups}
    assert all(getattr(m, "_diffusers_hook", None) is None or m._diffusers_hook.get_hook(HOOK_NAME) is None
               for m in mods)
    monkeypatch.setattr(type(s.family), "row_conditioning", ())
    ref = s.sample(3, seed=2, progress=False).images
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)  # the GEMM on fewer rows rounds differently
