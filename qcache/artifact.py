"""The artifact directory: atomic creation, ``manifest.json`` with a sha256 per file, verification on load.

An artifact is built in a temporary sibling directory and renamed into place only when complete, so a killed run
never leaves half an artifact. ``verify_artifact`` refuses a directory whose manifest is missing, of an unknown
format version, or whose files are missing or do not match their checksums, naming the file at fault.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from . import __version__
from .errors import QcacheError

FORMAT_NAME = "qcache-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(QcacheError):
    """An artifact that cannot be trusted or read; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _listing(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def write_manifest(root: Path, base_model: str, extra: dict | None = None) -> dict:
    """Write ``manifest.json`` listing the sha256 of every other file under ``root``."""
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "qcache_version": __version__,
        "base_model": base_model,
        "created_unix": int(time.time()),
        **(extra or {}),
        "files": _listing(root),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; on success rename it to ``final`` (replacing an old one).

    On any exception the temporary directory is removed and ``final`` is left as it was. The caller writes the
    manifest inside the block.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_artifact(root: Path) -> dict:
    """Check format, version and every file's checksum; return the manifest."""
    root = Path(root)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"artifact: directory not found: {root}")
    if not mpath.is_file():
        raise ArtifactError(f"artifact: {mpath} is missing (not a qcache artifact, or an unfinished one)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"artifact: {mpath} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"artifact: {mpath}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"artifact: {mpath}: unknown format_version {manifest.get('format_version')!r} "
                            f"(this qcache {__version__} reads version {FORMAT_VERSION})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"artifact: {mpath}: no file list")
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file():
            raise ArtifactError(f"artifact: file listed in the manifest is missing: {p}")
        if sha256_file(p) != digest:
            raise ArtifactError(f"artifact: checksum mismatch for {p} (the file was modified or is corrupt)")
    return manifest


# ---- the compressed model's files ------------------------------------------------------------------------------
RECIPE_FILE = "recipe.yaml"
TRANSFORMER_DIR = "transformer"
SCHEDULER_FILE = "scheduler_config.json"
SCHEDULE_FILE = "cache_schedule.json"
VC_FILE = "vc_factors.safetensors"
PROMPTS_FILE = "prompts.json"  # text models: the prompt list (and negative prompt) the model was calibrated with


def write_artifact(final: str | Path, compressed, recipe, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``compressed`` (a ``CompressedModel``) with its resolved recipe and ``extra_files`` (relative path ->
    bytes: report, plots) as an artifact directory at ``final``, atomically; returns ``final``."""
    import yaml
    from safetensors.torch import save_file

    from .quant import save_quantized
    from .recipe import recipe_to_dict

    final = Path(final)
    with staging_dir(final) as tmp:
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        save_quantized(compressed.transformer, tmp / TRANSFORMER_DIR)
        (tmp / SCHEDULER_FILE).write_text(json.dumps(compressed.scheduler_config, indent=2, default=str) + "\n")
        if compressed.schedule is not None:
            (tmp / SCHEDULE_FILE).write_text(json.dumps(compressed.schedule.to_dict(), indent=2) + "\n")
        if compressed.vc_factors is not None:
            save_file({"factors": compressed.vc_factors.float().contiguous()}, str(tmp / VC_FILE),
                      metadata={"format": "qcache-vc/1"})
        cond = compressed.parts.conditioner
        if hasattr(cond, "prompts"):
            (tmp / PROMPTS_FILE).write_text(json.dumps({"prompts": cond.prompts,
                                                        "negative_prompt": cond.negative_prompt}, indent=1) + "\n")
        for rel, data in (extra_files or {}).items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        components = {
            "quant": compressed.transformer.qcache_quant.get("preset"),
            "cache": compressed.schedule.policy if compressed.schedule is not None else "none",
            "nfc": compressed.nfc,
            "steps": compressed.sampling.steps,
            "sampler": compressed.sampling.scheduler,
            "vc": compressed.vc_factors is not None,
        }
        # the artifact holds the quantized transformer only: text encoders and the VAE come from base_model
        write_manifest(tmp, compressed.source, {"family": compressed.family,
                                                "pipeline_class": compressed.parts.family.pipeline_class,
                                                "vae": compressed.parts.vae is not None,
                                                "components": components})
    return final


def resolve_artifact(path: str | Path) -> Path:
    """The artifact directory for ``path``: the directory itself, or its ``artifact/`` (a compress output dir)."""
    p = Path(path)
    if not (p / MANIFEST).exists() and (p / "artifact" / MANIFEST).exists():
        return p / "artifact"
    return p


def load_artifact(path: str | Path, device: str = "auto"):
    """Verify and load an artifact (or a compress output directory) into a ``CompressedModel``.

    The quantized transformer, schedule and VC factors come from the artifact; the conditioner's text encoders and
    the VAE of latent-space models come from the manifest's ``base_model`` (a local directory or a hub id).
    """
    import yaml
    from safetensors.torch import load_file

    from .cache import StaticSchedule
    from .compressed import CompressedModel
    from .models.loading import build_parts, resolve_device, resolve_location
    from .quant import load_quantized
    from .recipe import RecipeError, recipe_from_dict

    root = resolve_artifact(path)
    manifest = verify_artifact(root)
    listed = set(manifest["files"])
    for required in (RECIPE_FILE, SCHEDULER_FILE, f"{TRANSFORMER_DIR}/quant_map.json"):
        if required not in listed:
            raise ArtifactError(f"artifact: {root / required} is not listed in the manifest (incomplete artifact)")
    try:
        recipe = recipe_from_dict(yaml.safe_load((root / RECIPE_FILE).read_text()))
    except (RecipeError, yaml.YAMLError) as e:
        raise ArtifactError(f"artifact: {root / RECIPE_FILE} is not a valid recipe: {e}") from None
    try:
        scheduler_config = json.loads((root / SCHEDULER_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"artifact: {root / SCHEDULER_FILE} is not valid JSON: {e}") from None
    schedule = None
    if SCHEDULE_FILE in listed:
        try:
            schedule = StaticSchedule.from_dict(json.loads((root / SCHEDULE_FILE).read_text()),
                                                where=f"artifact: {root / SCHEDULE_FILE}")
        except json.JSONDecodeError as e:
            raise ArtifactError(f"artifact: {root / SCHEDULE_FILE} is not valid JSON: {e}") from None
    factors = None
    if VC_FILE in listed:
        try:
            factors = load_file(str(root / VC_FILE))["factors"]
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(f"artifact: cannot read {root / VC_FILE}: {str(e).splitlines()[0]}") from None
    prompts, negative = None, None
    if PROMPTS_FILE in listed:
        try:
            pj = json.loads((root / PROMPTS_FILE).read_text())
            prompts, negative = list(pj["prompts"]), pj.get("negative_prompt")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ArtifactError(f"artifact: {root / PROMPTS_FILE} is not a valid prompt list: {e}") from None
    dev = resolve_device(recipe.model.device if device == "auto" else device)
    transformer = load_quantized(root / TRANSFORMER_DIR, device=dev)
    if factors is not None and factors.shape[0] != recipe.sampling.steps:
        raise ArtifactError(f"artifact: {root / VC_FILE} has {factors.shape[0]} steps, the recipe samples "
                            f"{recipe.sampling.steps}")
    base = manifest.get("base_model", "")
    condition = recipe.condition
    if negative is not None:
        condition = dataclasses.replace(condition, negative_prompt=negative or None)
    use_vae = manifest.get("vae")
    from .families import family_for

    family = family_for(transformer)
    try:
        location = resolve_location(base)
    except QcacheError:
        if family.text_conditioned or use_vae:  # text encoders / the VAE come from the base model
            raise
        location = base  # a pixel-space class model needs nothing from its base model
    parts = build_parts(transformer, location, dev, transformer.dtype, condition, prompts, use_vae)
    return CompressedModel(transformer, scheduler_config, recipe.sampling, recipe.cache, schedule, factors,
                           source=base, info={"manifest": manifest, "path": str(root), "recipe": recipe},
                           parts=parts)
