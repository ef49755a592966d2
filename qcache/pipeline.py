"""The compress pipeline's stages as plain functions: each takes what the one before produced and returns its own.

    tuned = tune_fp_tau(recipe, fp, sched)                     tau of RCS on the FP model (build_pool calls it)
    pool, info = build_pool(recipe, fp, sched)                 cache-aware calibration pool (FP weights, cache on)
    selection = select_calibration(recipe, pool)               random | kmeans | tap
    qmodel = quantize_model(recipe, fp, sched, selection)      a quantized copy; ``fp`` is left untouched
    schedule, info = cache_schedule(recipe, qmodel, sched)     tau for the target NFC -> static full-step mask
    factors, curves = fit_variance_compensation(...)           VC against the FP trajectory, per-step errors
    metrics = evaluate_pair(...)                               both models on the same noise, latency in one run

``qcache.compress`` runs them in order, keeping every product on disk so that a killed run resumes. Every stage
takes the model's ``parts`` (``qcache.families.ModelParts``: conditioner and VAE decoder; default: the class
conditioner of a pixel-space model), so the same stages serve DiT, PixArt and SD3. Quality is measured on images:
latent-space samples are decoded by the VAE first.

Data parallel (``qcache.distributed``, several processes under ``accelerate launch`` or ``torchrun``): every rank
calls the same functions in the same order. Per-image sampling (calibration pool, reference and evaluation
samples, quality sweep) is split by batch, each batch computed exactly as one process computes it, and gathered on
rank 0; the calibration pass is split by batch of rows and its statistics merged (``quant.observers``); work that
is one search or one batch (tau tuning, latency, metrics here; the schedule and the VC fitting batch in
``qcache.compress``) runs on rank 0 and its result is broadcast. Functions whose product only rank 0 keeps
return None in its place on the others.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from . import distributed
from .compressed import CompressedModel
from .evaluate import flops_per_image, quality_metrics, time_interleaved
from .families.parts import ModelParts, default_parts
from .metrics import compare_sets
from .recipe import Recipe
from .sampling import Sampler, SampleSet, make_noise

CALIBRATION_BATCH = 128  # rows per forward pass of the calibration set (quantize_transformer's batch_size)


def _parts(parts: ModelParts | None, transformer: torch.nn.Module) -> ModelParts:
    return parts if parts is not None else default_parts(transformer)


def _sampler(recipe: Recipe, transformer: torch.nn.Module, scheduler_config: dict, parts: ModelParts) -> Sampler:
    return Sampler(transformer, scheduler_config, recipe.sampling, conditioner=parts.conditioner)


def _pixels(samples: SampleSet, parts: ModelParts) -> SampleSet:
    return SampleSet(parts.to_pixels(samples.images), samples.labels)


def _quiet(msg: str) -> None:
    pass


def needs_calibration(recipe: Recipe, fp: torch.nn.Module) -> bool:
    """Whether the quant preset (with its overrides) quantizes any activation with static ranges, or searches int4
    weight clipping on calibration activations, i.e. needs calibration data (the torchao backend quantizes
    activations dynamically and never does)."""
    from .quant import plan_quantization

    if recipe.quant.backend == "torchao":
        return False
    plan = plan_quantization(fp, recipe.quant).values()
    return any(s["activations"] != "none" for s in plan) or (
        recipe.quant.weight_clip == "search" and any(s["weights"] == "int4" for s in plan))


def has_cache(recipe: Recipe) -> bool:
    return recipe.cache.policy != "none"


# ---- calibration ---------------------------------------------------------------------------------------------
def tune_fp_tau(recipe: Recipe, fp: torch.nn.Module, scheduler_config: dict, parts: ModelParts | None = None):
    """RCS's tau tuned to ``cache.target_nfc`` on the FP model, or None when the pool has nothing to tune.

    The cache-aware pool is sampled with this tau, and the schedule stage's search (on ``schedule_model``) starts
    from it (``cache_schedule``'s ``tau_guess``): the FP and quantized models need nearly the same tau. Nothing is
    tuned without a cache-aware pool, without RCS, with a fixed ``cache.tau`` or with a replayed ``cache.schedule``.
    """
    from .cache import tune_tau

    cfg = recipe.cache
    if not (recipe.calibration.cache_aware and cfg.policy == "rfc" and cfg.rcs and cfg.tau is None
            and cfg.schedule is None):
        return None
    return tune_tau(_sampler(recipe, fp, scheduler_config, _parts(parts, fp)), cfg, cfg.target_nfc)


def build_pool(recipe: Recipe, fp: torch.nn.Module, scheduler_config: dict, progress: bool = False,
               parts: ModelParts | None = None):
    """The calibration pool: model inputs of the full steps along trajectories sampled with the recipe's cache.

    tau is tuned first, in the open (``tune_fp_tau``), and reported in ``info`` (``tau``, ``tune_nfc``, ``probes``).
    """
    from calibration.collect import collect_for_recipe

    tuned = distributed.current().on_main(lambda: tune_fp_tau(recipe, fp, scheduler_config, parts))
    pool, cache = collect_for_recipe(recipe, progress=progress, transformer=fp, scheduler_config=scheduler_config,
                                     conditioner=_parts(parts, fp).conditioner, tau=tuned.tau if tuned else None)
    if pool is None:  # another rank's share: rank 0 holds the pool
        return None, None
    info = {"rows": len(pool), "images": recipe.calibration.pool_images,
            "cache": recipe.cache.policy if cache is not None else "none"}
    if cache is not None:
        info["mean_nfc"] = cache.stats.mean_nfc()
        info["tau"] = getattr(cache.policy, "tau", None)
    if tuned is not None:
        info.update(tune_nfc=tuned.nfc, probes=[list(p) for p in tuned.probes])
    return pool, info


def select_calibration(recipe: Recipe, pool):
    """The calibration set picked from ``pool`` by the recipe's selector."""
    from calibration.select import select_from_config

    return select_from_config(pool, recipe.calibration)


# ---- quantization ----------------------------------------------------------------------------------------------
def quantize_model(recipe: Recipe, fp: torch.nn.Module, selection=None,
                   parts: ModelParts | None = None) -> torch.nn.Module:
    """A quantized copy of ``fp`` per ``recipe.quant``, activation ranges observed on ``selection``.

    Several processes: ``selection`` is read on rank 0 only; each rank observes its batches of rows and the ranges
    are merged, so every rank gets the same model, the one a single process builds."""
    from .quant import quantize_transformer
    from .quant.observers import reduced_across

    model = copy.deepcopy(fp)
    conditioner = _parts(parts, fp).conditioner
    d = distributed.current()
    if not d.active:
        return quantize_transformer(model, recipe.quant, selection, guidance=recipe.sampling.guidance_scale,
                                    batch_size=CALIBRATION_BATCH, conditioner=conditioner)
    rows = d.on_main(lambda: None if selection is None else len(selection))
    if rows is None:  # nothing to observe: every rank quantizes the weights alike
        with d.guard():
            model = quantize_transformer(model, recipe.quant, None, guidance=recipe.sampling.guidance_scale,
                                         batch_size=CALIBRATION_BATCH, conditioner=conditioner)
        return model
    share = d.scatter(_calibration_shares(selection, rows, d.world_size) if d.is_main else None)
    counts, columns, features = share
    with d.guard():
        from datasets import Dataset

        calib = Dataset.from_dict(columns, features=features)
        with reduced_across(lambda obj: d.all_gather(obj if counts else None)):
            model = quantize_transformer(model, recipe.quant, calib, guidance=recipe.sampling.guidance_scale,
                                         batch_size=CALIBRATION_BATCH, conditioner=conditioner)
        model.qcache_quant["calibration_rows"] = rows  # all of them, as one process records
    return model


def _calibration_shares(selection, rows: int, world: int) -> list[tuple[bool, dict, object]]:
    """Per rank: (whether its rows count, its rows' columns, the features) — the rows of the calibration batches
    b with ``b % world == rank``. A rank with no batch gets the first row, observed but not counted, so that every
    rank runs the same passes."""
    batches = distributed.split_batches(rows, CALIBRATION_BATCH)
    out = []
    for r in range(world):
        idx = [i for b in distributed.Dist(r, world).mine(len(batches)) for i in range(*batches[b])]
        sub = selection.select(idx or [0])
        out.append((bool(idx), sub.with_format("numpy")[:], sub.features))
    return out


# ---- cache schedule --------------------------------------------------------------------------------------------
def schedule_model(recipe: Recipe, fp: torch.nn.Module, compressed: torch.nn.Module) -> torch.nn.Module:
    """The transformer whose RCS error trace chooses the schedule (``cache.schedule_on``).

    ``fp`` (default): full steps go where the full-precision trajectory changes, the one the compressed model is
    measured against; on the quantized model RCS also reacts to the quantization noise of the watched input
    (digits, W8A8 NFC 14, n = 500: FID-to-FP 0.174 with the FP model's schedule against 0.219 with its own,
    docs/cache.md)."""
    return fp if recipe.cache.schedule_on == "fp" else compressed


def cache_schedule(recipe: Recipe, model: torch.nn.Module, scheduler_config: dict, tau_guess: float | None = None,
                   parts: ModelParts | None = None):
    """The static full-step schedule of the recipe's cache on ``model``: replayed, tuned to target_nfc, or recorded.

    ``tau_guess`` starts the tau search (the FP model's tau from the pool stage is a close guess). A tuned schedule
    has exactly ``target_nfc`` full steps (``qcache.cache.exact_nfc_schedule``; ``info["method"]``: ``tau`` when a
    tau gave it, ``trace`` when it was chosen on the RCS error trace). Returns (schedule or None without a cache,
    info with tau, method and the tuning probes).
    """
    from .cache import attach_cache, record_schedule, resolve_cache

    cfg = recipe.cache
    if cfg.policy == "none":
        return None, {"policy": "none"}
    sampler = _sampler(recipe, model, scheduler_config, _parts(parts, model))
    setup = resolve_cache(sampler, cfg, tau_guess=tau_guess)
    if setup.schedule is not None:  # replayed, or tuned to exactly target_nfc full steps
        return setup.schedule, setup.info()
    with attach_cache(model, cfg, tau=cfg.tau, sampler=sampler) as cache:  # as given: record one batch's steps
        sampler.sample(cfg.tune_samples, seed=cfg.tune_seed, progress=False)
    return record_schedule(cache, sampler, tau=cfg.tau), setup.info()


# ---- variance compensation -------------------------------------------------------------------------------------
def fit_variance_compensation(recipe: Recipe, compressed: CompressedModel, fp: torch.nn.Module,
                              scheduler_config: dict, with_info: bool = False):
    """VC factors for ``compressed`` (fitted with its cache replaying) and per-step errors against the FP trajectory.

    Returns (factors or None when ``vc.enabled`` is false or ``auto`` dropped them on the held-out batch, curves:
    relative L2 error of x_t per step without and with the factors; ``qcache.vc.fit_and_validate``), and the
    decision's info as a third item with ``with_info``.
    """
    from .vc import Batch, fit_and_validate

    v = recipe.vc
    fp_sampler = _sampler(recipe, fp, scheduler_config, compressed.parts)

    def batch(n: int, seed: int) -> Batch:
        return Batch(make_noise(n, fp_sampler.sample_shape, seed), fp_sampler.conditioner.default_ids(n), seed)

    holdout = batch(v.holdout_samples, v.holdout_seed) if v.enabled == "auto" else None  # only auto pays for it
    res = fit_and_validate(lambda: compressed.sampler(vc=False), fp_sampler, batch(v.samples, v.seed), holdout,
                           v.enabled, (v.clamp_min, v.clamp_max), v.fit, v.min_gain)
    return (res.factors, res.curves, res.info) if with_info else (res.factors, res.curves)


# ---- evaluation ------------------------------------------------------------------------------------------------
def reference_samples(recipe: Recipe, fp: torch.nn.Module, scheduler_config: dict, progress: bool = False,
                      parts: ModelParts | None = None) -> tuple[SampleSet, dict]:
    """The FP model's ``eval.n`` images (the reference every compressed image is compared with) and its quality.

    Several processes: sampled by batch on every rank; (None, None) on all but rank 0."""
    parts = _parts(parts, fp)
    d = distributed.current()
    raw = distributed.sample_parallel(_sampler(recipe, fp, scheduler_config, parts), recipe.eval.n,
                                      progress=progress, desc="full precision")
    out = (None, None)
    with d.guard():
        if raw is not None:
            samples = _pixels(raw, parts)
            out = (samples, quality_metrics(samples, parts.conditioner))
    return out


def model_bytes(model: torch.nn.Module) -> int:
    """Size of ``model``'s state dict as one safetensors file (the FP baseline of the size ratio)."""
    from safetensors.torch import save

    return len(save({k: v.contiguous() for k, v in model.state_dict().items()}))


def evaluate_pair(recipe: Recipe, fp: torch.nn.Module, scheduler_config: dict, compressed: CompressedModel,
                  reference: SampleSet, reference_quality: dict, compressed_bytes: int,
                  progress: bool = False) -> dict:
    """Metrics of the FP and compressed models on the same noise; latencies measured here, in one run.

    Several processes: the compressed samples are split by batch; rank 0 alone measures latency, FLOPs and metrics
    (the others wait) and returns the metrics; the others return None."""
    d = distributed.current()
    if d.active:
        with compressed.sampler() as s:
            raw = distributed.sample_parallel(s, recipe.eval.n, progress=progress, desc="compressed")
        out = None
        with d.guard():
            if raw is not None:
                out = _evaluate_pair(recipe, fp, scheduler_config, compressed, reference, reference_quality,
                                     compressed_bytes, progress, raw)
        return out
    return _evaluate_pair(recipe, fp, scheduler_config, compressed, reference, reference_quality, compressed_bytes,
                          progress, None)


def _evaluate_pair(recipe: Recipe, fp: torch.nn.Module, scheduler_config: dict, compressed: CompressedModel,
                   reference: SampleSet, reference_quality: dict, compressed_bytes: int, progress: bool,
                   raw: SampleSet | None) -> dict:
    e = recipe.eval
    n_lat = min(e.latency_samples, e.n)
    parts = compressed.parts
    fp_sampler = _sampler(recipe, fp, scheduler_config, parts)
    fp_bytes = model_bytes(fp)
    fp_flops = flops_per_image(fp_sampler)
    with compressed.sampler() as s:
        samples = _pixels(s.sample(e.n, progress=progress, desc="compressed") if raw is None else raw, parts)
        fp_latency, c_latency = time_interleaved([fp_sampler, s], n_lat, e.latency_repeats)
    # FLOPs count multiply-adds whatever their precision (quanto's int8 kernels are opaque to torch's counter):
    # the compressed model's are those of the FP weights on the same cache schedule
    with dataclasses.replace(compressed, transformer=fp, vc_factors=None).sampler() as s:
        c_flops = flops_per_image(s)
    fp_row = {"nfc": recipe.sampling.steps, "flops_per_image": fp_flops, "flops_ratio": 1.0,
              "latency_s": fp_latency, "latency_ratio": 1.0, "size_bytes": fp_bytes, "size_ratio": 1.0,
              **{k: v for k, v in compare_sets(reference.images, reference.images).items() if k != "ssim"},
              **reference_quality}
    cmp = compare_sets(reference.images, samples.images)
    c_row = {"nfc": compressed.nfc, "flops_per_image": c_flops, "flops_ratio": fp_flops / max(c_flops, 1),
             "latency_s": c_latency, "latency_ratio": fp_latency / c_latency, "size_bytes": compressed_bytes,
             "size_ratio": fp_bytes / compressed_bytes, "fid_to_fp": cmp["fid_to_fp"], "psnr": cmp["psnr"],
             "ssim": cmp["ssim"], **quality_metrics(samples, parts.conditioner)}
    return {"n": e.n, "latency_samples": n_lat, "latency_repeats": e.latency_repeats,
            "full_precision": fp_row, "compressed": c_row, "_samples": samples}


SWEEP_TAU_FACTORS = (0.0, 0.3, 1.0, 2.5)
SWEEP_NFCS = (50, 25, 17, 14, 10, 8)


def quality_sweep(recipe: Recipe, compressed: CompressedModel, reference: SampleSet, tau: float | None,
                  n: int = 100, progress: bool = False) -> list[dict]:
    """FID-to-FP and PSNR of the quantized model (VC off) at several cache settings: quality against NFC.

    RCS runs live at multiples of the tuned tau; fixed schedules at a list of NFCs. Images: the first ``n`` of the
    reference noise. Several processes: each setting's images are split by batch; ``reference`` is needed on rank 0
    only (None elsewhere), which returns the points (the others return None).
    """
    from .cache import attach_cache

    d = distributed.current()
    cfg, steps = compressed.cache, compressed.sampling.steps
    if compressed.schedule is None or cfg.policy == "none":
        return [] if reference is not None else None
    count, labels = d.broadcast((len(reference.images), reference.labels) if reference is not None else None)
    n = min(n, count)
    if cfg.policy == "rfc" and cfg.rcs and tau:
        settings = [dict(tau=tau * f) for f in SWEEP_TAU_FACTORS]
    else:
        settings = [dict(nfc=k) for k in sorted({steps, *[k for k in SWEEP_NFCS if cfg.warmup <= k < steps]},
                                                 reverse=True)]
    points = []
    sampler = Sampler(compressed.transformer, compressed.scheduler_config, compressed.sampling,
                      conditioner=compressed.parts.conditioner)
    noise = make_noise(count, sampler.sample_shape, compressed.sampling.seed)[:n]
    for st in settings:
        if "tau" in st:
            cache = attach_cache(compressed.transformer, dataclasses.replace(cfg, target_nfc=None), tau=st["tau"])
        else:
            fixed = dict(rcs=False) if cfg.policy == "rfc" else {}
            cache = attach_cache(compressed.transformer, dataclasses.replace(cfg, target_nfc=st["nfc"], **fixed))
        try:
            with sampler.extra_hooks(cache):
                out = distributed.sample_parallel(sampler, n, labels=labels[:n], noise=noise, progress=progress,
                                                  desc="quality sweep")
            distributed.merge_cache_stats(cache.stats, len(distributed.split_batches(n, sampler.config.batch_size)))
        finally:
            cache.remove()
        with d.guard():
            if out is not None:
                nfc = cache.stats.mean_nfc()
                cmp = compare_sets(reference.images[:n], compressed.parts.to_pixels(out.images))
                points.append({**st, "nfc": nfc, "fid_to_fp": cmp["fid_to_fp"], "psnr": cmp["psnr"], "n": n})
    return points if reference is not None else None
