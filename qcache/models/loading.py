"""Resolve ``model.source`` and load the transformer plus the noise schedule it was trained with.

A source is ``builtin:NAME`` (shipped with qcache), a local directory in diffusers layout (a pipeline directory
with ``transformer/`` and ``scheduler/``, or a bare transformer directory), or a hub id such as
``facebook/DiT-XL-2-256`` loaded with the real ``from_pretrained``. Every failure is one line that names
``model.source`` and the cause.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QcacheError
from ..recipe import ModelConfig
from .builtin_models import BUILTIN_DIR, BUILTIN_PREFIX, builtin_names

SUPPORTED_CLASSES = ("DiTTransformer2DModel",)
# DiT's published training schedule; used when a source ships no scheduler config.
DEFAULT_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A loaded transformer in eval mode, with the scheduler config it was trained under."""

    transformer: torch.nn.Module
    scheduler_config: dict
    source: str
    device: torch.device
    dtype: torch.dtype


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
    if path.is_dir():
        return path
    if path.exists():
        raise QcacheError(f"model.source: {source!r} is a file, expected a diffusers model directory")
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise QcacheError(f"model.source: directory not found: {source}")
    return None  # a hub id


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QcacheError(f"model.source: cannot read {path}: {e}") from None


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load ``cfg.source`` onto ``cfg.device`` in ``cfg.dtype``; raise QcacheError with a one-line reason on failure."""
    from diffusers import DiTTransformer2DModel

    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    local = _local_dir(cfg.source)
    if local is not None:
        sub = local / "transformer"
        tdir = sub if sub.is_dir() else local
        if not (tdir / "config.json").is_file():
            raise QcacheError(f"model.source: no config.json in {tdir} (not a diffusers model directory)")
        class_name = _read_json(tdir / "config.json").get("_class_name")
        if class_name not in SUPPORTED_CLASSES:
            raise QcacheError(f"model.source: model class {class_name!r} is not supported yet "
                              f"(supported: {', '.join(SUPPORTED_CLASSES)})")
        try:
            transformer = DiTTransformer2DModel.from_pretrained(str(tdir), torch_dtype=dtype)
        except Exception as e:  # corrupt or truncated weights, missing files
            raise QcacheError(f"model.source: cannot load weights from {tdir}: {str(e).splitlines()[0]}") from None
        sched_file = local / "scheduler" / "scheduler_config.json"
        sched = _read_json(sched_file) if sched_file.is_file() else dict(DEFAULT_SCHEDULER_CONFIG)
    else:
        transformer = _from_hub(DiTTransformer2DModel, cfg.source, dtype)
        try:
            from diffusers import DDIMScheduler

            sched = dict(DDIMScheduler.load_config(cfg.source, subfolder="scheduler"))
        except Exception:
            sched = dict(DEFAULT_SCHEDULER_CONFIG)
    transformer = transformer.to(device).eval().requires_grad_(False)
    return LoadedModel(transformer, sched, cfg.source, device, dtype)


def _from_hub(cls: type, repo_id: str, dtype: torch.dtype) -> torch.nn.Module:
    """``from_pretrained`` on a hub id: the local cache first, then the network; one clear line when both fail."""
    import os

    try:
        return cls.from_pretrained(repo_id, subfolder="transformer", torch_dtype=dtype, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise QcacheError(f"model.source: {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                          f"set; download it first or point model.source at a local directory") from None
    try:
        return cls.from_pretrained(repo_id, subfolder="transformer", torch_dtype=dtype)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise QcacheError(f"model.source: could not load {repo_id!r} from the Hugging Face hub (no network, or no "
                          f"such repository?): {type(e).__name__}: {first}") from None
