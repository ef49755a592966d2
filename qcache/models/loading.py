"""Resolve ``model.source`` and load the transformer plus the noise schedule it was trained with.

A source is ``builtin:NAME`` (shipped with qcache), a local directory in diffusers layout (a pipeline directory
with ``transformer/`` and ``scheduler/``, or a bare transformer directory), or a hub id such as
``facebook/DiT-XL-2-256`` loaded with the real ``from_pretrained``. The transformer's diffusers class picks its
model family (``qcache.families``: DiT, PixArt, SD3, FLUX). ``load_parts`` then builds what surrounds it: the
conditioner (class labels, or the recipe's prompts through the pipeline's own text encoders) and the VAE decoder
of latent-space models. Every failure is one line that names ``model.source`` (or the recipe key) and the cause.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QcacheError
from ..families.registry import family_for_class, supported_classes
from ..recipe import ConditionConfig, ModelConfig
from .builtin_models import BUILTIN_DIR, BUILTIN_PREFIX, builtin_names

SUPPORTED_CLASSES = supported_classes()
# DiT's published training schedule; used when a source ships no scheduler config.
DEFAULT_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                            "beta_schedule": "linear"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A loaded transformer in eval mode, with the scheduler config it was trained under.

    ``location`` is where its pipeline lives (a local directory, or the hub id): text encoders and the VAE load
    from there.
    """

    transformer: torch.nn.Module
    scheduler_config: dict
    source: str
    device: torch.device
    dtype: torch.dtype
    location: str = ""


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA device on a machine without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QcacheError(f"model.device: {device!r} asked for, but no CUDA device is available")
    return torch.device(device)


def _local_dir(source: str) -> Path | None:
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        path = BUILTIN_DIR / name
        if not (path / "transformer").is_dir():
            raise QcacheError(f"model.source: unknown builtin model {source!r} (available: "
                              f"{', '.join(BUILTIN_PREFIX + n for n in builtin_names()) or 'none'})")
        return path
    path = Path(source).expanduser()
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except (OSError, ValueError) as e:  # a name too long for the file system, ...
        raise QcacheError(f"model.source: cannot use {source[:200]!r}: {getattr(e, 'strerror', None) or e}") from None
    if is_dir:
        return path
    if exists:
        raise QcacheError(f"model.source: {source!r} is a file, expected a diffusers model directory")
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise QcacheError(f"model.source: directory not found: {source[:200]}")
    return None  # a hub id


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; anything else (unreadable, not UTF-8, not JSON, not an object) is one line."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON and UTF-8 decoding errors
        raise QcacheError(f"model.source: cannot read {path}: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise QcacheError(f"model.source: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def check_scheduler_config(config: dict, where: str) -> dict:
    """``config`` if diffusers builds the scheduler it names (``_class_name``, default DDPM) from it: a model's
    training schedule that diffusers refuses (``beta_schedule: bogus``) is a one-line error naming ``where``."""
    import diffusers

    name = config.get("_class_name") or "DDPMScheduler"
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.endswith("Scheduler") else None
    if cls is None:
        raise QcacheError(f"{where}: _class_name: not a diffusers scheduler, got {str(name)[:200]!r}")
    try:
        cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except Exception as e:  # ValueError, NotImplementedError, TypeError, ... from the scheduler's __init__
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise QcacheError(f"{where}: not accepted by diffusers {name}: {msg}") from None
    return config


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load ``cfg.source`` onto ``cfg.device`` in ``cfg.dtype``; raise QcacheError with a one-line reason on failure."""
    import diffusers

    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    local = _local_dir(cfg.source)
    if local is not None:
        sub = local / "transformer"
        tdir = sub if sub.is_dir() else local
        if not (tdir / "config.json").is_file():
            raise QcacheError(f"model.source: no config.json in {tdir} (not a diffusers model directory)")
        class_name = _read_json(tdir / "config.json").get("_class_name")
        family_for_class(str(class_name)[:200])  # unsupported class: one line naming model.source
        cls = getattr(diffusers, class_name)
        try:
            transformer = cls.from_pretrained(str(tdir), torch_dtype=dtype)
        except Exception as e:  # corrupt or truncated weights, missing files
            raise QcacheError(f"model.source: cannot load weights from {tdir}: {str(e).splitlines()[0]}") from None
        sched_file = local / "scheduler" / "scheduler_config.json"
        sched = _read_json(sched_file) if sched_file.is_file() else dict(DEFAULT_SCHEDULER_CONFIG)
        check_scheduler_config(sched, f"model.source: {sched_file}")
        location = str(local)
    else:
        transformer = _from_hub(cfg.source, dtype)
        try:
            from diffusers import DDIMScheduler

            sched = dict(DDIMScheduler.load_config(cfg.source, subfolder="scheduler"))
        except Exception:
            sched = dict(DEFAULT_SCHEDULER_CONFIG)
        check_scheduler_config(sched, f"model.source: {cfg.source} scheduler config")
        location = cfg.source
    transformer = transformer.to(device).eval().requires_grad_(False)
    return LoadedModel(transformer, sched, cfg.source, device, dtype, location)


def resolve_location(source: str) -> str:
    """Where the pipeline of ``source`` lives: its local directory (builtin models included), or the hub id."""
    local = _local_dir(source)
    return str(local) if local is not None else source


def build_parts(transformer: torch.nn.Module, location: str, device: torch.device, dtype: torch.dtype,
                condition: ConditionConfig | None = None, prompts: list[str] | None = None,
                vae: bool | None = None):
    """The ``ModelParts`` of a transformer whose pipeline lives at ``location``: family, conditioner, VAE decoder.

    Class models get a ``ClassConditioner`` (``condition.classes`` as the default id cycle). Text models read
    ``condition.prompts`` (unless ``prompts`` is given) and encode them once with the pipeline's own text
    encoders. The VAE is the pipeline's ``vae/`` (hub ids: always, checked on first use); a latent-space family
    without one is an error. ``vae`` forces the decision (an artifact records it).
    """
    from ..families.parts import LazyVae, ModelParts
    from ..families.registry import family_for
    from ..families.text import read_prompts

    condition = condition or ConditionConfig()
    family = family_for(transformer)
    if family.text_conditioned and prompts is None:
        if condition.prompts is None:
            raise QcacheError(f"condition.prompts: {type(transformer).__name__} is text-conditional; give a prompt "
                              f"dataset (a datasets directory with a 'prompt' column)")
        prompts = read_prompts(condition.prompts)
    if not family.text_conditioned and condition.prompts is not None:
        raise QcacheError(f"condition.prompts: {type(transformer).__name__} is class-conditional; use "
                          f"condition.classes instead")
    if vae is None:  # hub pipelines ship their VAE (checked on first use); local ones have a vae/ folder or none
        vae = not Path(location).is_dir() or (Path(location) / "vae" / "config.json").is_file()
    if not vae and family.needs_vae:
        raise QcacheError(f"model.source: {type(transformer).__name__} is a latent-space model but {location} has "
                          f"no vae/ folder")
    if family.text_conditioned and Path(location).is_dir():
        _check_text_components(family, location)
    conditioner = family.make_conditioner(transformer, location, condition, prompts, device, dtype)
    return ModelParts(family, conditioner, LazyVae(location, device, dtype) if vae else None)


# the text components each pipeline class loads from its directory (its own encode_prompt uses all of them)
TEXT_COMPONENTS = {
    "PixArtAlphaPipeline": ("text_encoder", "tokenizer"),
    "PixArtSigmaPipeline": ("text_encoder", "tokenizer"),
    "StableDiffusion3Pipeline": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                                 "tokenizer_3"),
    "FluxPipeline": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),  # CLIP (pooled), T5 (sequence)
}


def _check_text_components(family, location: str) -> None:
    """One line naming the first text encoder / tokenizer folder a local pipeline directory lacks."""
    from ..families.text import pipeline_class_name

    cls = pipeline_class_name(location, family.pipeline_class)
    for name in TEXT_COMPONENTS.get(cls, ()):
        if not (Path(location) / name).is_dir():
            raise QcacheError(f"model.source: {location} has no {name}/ folder ({cls} encodes prompts with "
                              f"{', '.join(TEXT_COMPONENTS[cls])})")


def load_parts(loaded: LoadedModel, condition: ConditionConfig | None = None, prompts: list[str] | None = None):
    """``build_parts`` for a ``LoadedModel``."""
    return build_parts(loaded.transformer, loaded.location or resolve_location(loaded.source), loaded.device,
                       loaded.dtype, condition, prompts)


def _hub_class(repo_id: str, local_only: bool) -> type:
    """The transformer class named by a hub repository's ``transformer/config.json``."""
    import diffusers

    cfg = diffusers.DiTTransformer2DModel.load_config(repo_id, subfolder="transformer", local_files_only=local_only)
    family_for_class(str(cfg.get("_class_name")))
    return getattr(diffusers, cfg["_class_name"])


def _from_hub(repo_id: str, dtype: torch.dtype) -> torch.nn.Module:
    """``from_pretrained`` on a hub id: the local cache first, then the network; one clear line when both fail."""
    import os

    try:
        cls = _hub_class(repo_id, local_only=True)
        return cls.from_pretrained(repo_id, subfolder="transformer", torch_dtype=dtype, local_files_only=True)
    except QcacheError:
        raise
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise QcacheError(f"model.source: {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                          f"set; download it first or point model.source at a local directory") from None
    try:
        cls = _hub_class(repo_id, local_only=False)
        return cls.from_pretrained(repo_id, subfolder="transformer", torch_dtype=dtype)
    except QcacheError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise QcacheError(f"model.source: could not load {repo_id!r} from the Hugging Face hub (no network, or no "
                          f"such repository?): {type(e).__name__}: {first}") from None
