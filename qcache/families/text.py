"""Text conditioning through a diffusers pipeline's own text encoders and ``encode_prompt``.

The pipeline named by the source's ``model_index.json`` (or the family's default) is loaded *without* its
transformer and VAE, and its ``encode_prompt`` turns prompts into the embeddings (and masks, pooled embeddings) the
transformer was trained on, exactly as the diffusers pipeline would. The prompt list of a recipe is encoded once;
the encoder is kept only as long as the returned ``Encoder`` closure is referenced.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import QcacheError


def pipeline_class_name(source: str, default: str) -> str:
    """``_class_name`` of a local source's ``model_index.json``, else ``default`` (hub ids: the family's)."""
    index = Path(source) / "model_index.json"
    if index.is_file():
        try:
            return str(json.loads(index.read_text()).get("_class_name") or default)
        except (OSError, json.JSONDecodeError):
            return default
    return default


def load_text_pipeline(class_name: str, source: str, dtype: torch.dtype, device: torch.device,
                       skip: tuple[str, ...] = ("transformer", "vae")) -> Any:
    """The diffusers pipeline ``class_name`` from ``source`` with the ``skip`` components left out (set to None)."""
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise QcacheError(f"model.source: unknown pipeline class {class_name!r} in {source}")
    none = {k: None for k in skip}
    local = Path(source).is_dir()
    try:
        if local:
            pipe = cls.from_pretrained(source, torch_dtype=dtype, **none)
        else:
            try:
                pipe = cls.from_pretrained(source, torch_dtype=dtype, local_files_only=True, **none)
            except Exception:
                if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
                    raise
                pipe = cls.from_pretrained(source, torch_dtype=dtype, **none)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QcacheError(f"model.source: cannot load the text encoders of {source} ({class_name}): {first}") from None
    return pipe.to(device)


def read_prompts(path: str | Path, what: str = "condition.prompts") -> list[str]:
    """The ``prompt`` column of a ``datasets`` directory saved with ``save_to_disk``."""
    from datasets import load_from_disk

    p = resolve_prompts_path(path)
    if p is None:
        raise QcacheError(f"{what}: no prompt dataset at {path}")
    try:
        ds = load_from_disk(str(p))
    except Exception as e:
        raise QcacheError(f"{what}: cannot load the prompt dataset at {p}: {str(e).splitlines()[0]}") from None
    if "prompt" not in ds.column_names:
        raise QcacheError(f"{what}: the dataset at {p} has no 'prompt' column (columns: {ds.column_names})")
    prompts = [str(x) for x in ds["prompt"]]
    if not prompts or not all(prompts):
        raise QcacheError(f"{what}: the dataset at {p} has an empty prompt list or an empty prompt")
    return prompts


def resolve_prompts_path(path: str | Path) -> Path | None:
    """``path`` as given (relative to the working directory), else relative to the qcache checkout (the prompt
    lists shipped under ``calibration/prompts/``); None when neither exists."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    repo = Path(__file__).resolve().parents[2] / p
    return repo if not p.is_absolute() and repo.is_dir() else None


def save_prompts(prompts: list[str], path: str | Path) -> Path:
    """Save a prompt list as a ``datasets`` directory with one ``prompt`` column (``read_prompts`` reads it)."""
    from datasets import Dataset

    from calibration.storage import save_dataset

    return save_dataset(Dataset.from_dict({"prompt": list(prompts)}), path)


def without_grad(fn: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    """``fn`` under ``torch.no_grad``."""
    def run(prompts: list[str]) -> Any:
        with torch.no_grad():
            return fn(prompts)
    return run
