"""The artifact directory: atomic creation, ``manifest.json`` with a sha256 per file, verification on load.

An artifact is built in a temporary sibling directory and renamed into place only when complete, so a killed run
never leaves half an artifact. ``verify_artifact`` refuses a directory whose manifest is missing, not a JSON object,
of an unknown format version, lists a path that is absolute, climbs out of the artifact (``..``) or goes through a
symbolic link, or whose files are missing or do not match their checksums, naming the file at fault. The set of
files that must be listed follows from the manifest's ``components`` (``required_files``): files qcache reads are
always listed and checked, and files that are not listed are never read. ``load_artifact`` then checks the values
it reads (recipe, scheduler config, schedule, VC factors, prompt list, quant map) before using them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from . import __version__
from .cli import apply_umask_tree, json_bytes, short, short_str
from .errors import QcacheError

FORMAT_NAME = "qcache-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CACHE_POLICIES = ("none", "fora", "taylorseer", "rfc")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    (root / MANIFEST).write_bytes(json_bytes(manifest))
    return manifest


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; on success rename it to ``final`` (replacing an old one).

    On any exception the temporary directory is removed and ``final`` is left as it was. The caller writes the
    manifest inside the block. Before the rename every directory and file gets the mode the umask gives new ones
    (``mkdtemp`` makes 0700).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        apply_umask_tree(tmp)
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


def _read_manifest(mpath: Path) -> dict:
    try:
        st = os.lstat(mpath)
    except FileNotFoundError:
        raise ArtifactError(f"artifact: {short_str(mpath)} is missing (not a qcache artifact, or an unfinished one)") \
            from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"artifact: {short_str(mpath)} is not a regular file")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"artifact: {short_str(mpath)} is not valid JSON: {short_str(e, 120)}") from None
    except RecursionError:
        raise ArtifactError(f"artifact: {short_str(mpath)} is not valid JSON: nested too deeply") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"artifact: {short_str(mpath)}: must be a JSON object, got {type(manifest).__name__}")
    return manifest


def check_listed_path(root: Path, rel: Any, mpath: Path) -> Path:
    """The file ``root/rel`` for a path listed in the manifest, after refusing anything that could leave the
    artifact: non-string, absolute, ``.``/``..``/empty components, backslashes, symbolic links on the way, and
    anything but a regular file at the end (nothing outside the artifact is ever opened, not even to hash it)."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(f"artifact: {short_str(mpath)}: files: listed path must be a non-empty string, got "
                            f"{short(rel)}")
    bad = None
    pure = PurePosixPath(rel)
    if rel.startswith("/") or pure.is_absolute():
        bad = "is absolute"
    elif "\\" in rel or "\x00" in rel:
        bad = "holds a backslash or NUL"
    elif any(part in ("", ".", "..") for part in rel.split("/")):
        bad = "holds '..', '.' or an empty component"
    elif rel == MANIFEST:
        bad = "is the manifest itself"
    if bad:
        raise ArtifactError(f"artifact: {short_str(mpath)}: files: listed path {short(rel)} {bad} (must be a "
                            f"relative path inside the artifact)")
    p = root
    parts = rel.split("/")
    for i, part in enumerate(parts):
        p = p / part
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise ArtifactError(f"artifact: file listed in the manifest is missing: {short_str(root / rel)}") from None
        except OSError as e:
            raise ArtifactError(f"artifact: cannot read {short_str(p)}: {e.strerror or e}") from None
        if stat.S_ISLNK(st.st_mode):
            raise ArtifactError(f"artifact: {short_str(p)} is a symbolic link (refused: artifact files must lie "
                                f"inside the artifact)")
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            raise ArtifactError(f"artifact: file listed in the manifest is missing: {short_str(root / rel)}")
        if last and not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"artifact: {short_str(p)} is not a regular file")
    return p


def required_files(manifest: dict, where: str = MANIFEST) -> set[str]:
    """The files an artifact with this manifest must list: transformer weights and quant map, recipe, scheduler
    config, the cache schedule when ``components.cache`` is not ``none``, the VC factors when ``components.vc``."""
    comps = manifest.get("components")
    if not isinstance(comps, dict):
        raise ArtifactError(f"artifact: {where}: components: missing (made by an older qcache? re-run "
                            f"qcache.compress)")
    cache, vc = comps.get("cache"), comps.get("vc")
    if cache not in CACHE_POLICIES:
        raise ArtifactError(f"artifact: {where}: components.cache: must be one of "
                            f"{', '.join(map(repr, CACHE_POLICIES))}, got {short(cache)}")
    if not isinstance(vc, bool):
        raise ArtifactError(f"artifact: {where}: components.vc: must be true or false, got {short(vc)}")
    for key in ("steps", "nfc"):
        v = comps.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ArtifactError(f"artifact: {where}: components.{key}: must be a positive integer, got {short(v)}")
    if not isinstance(comps.get("sampler"), str):
        raise ArtifactError(f"artifact: {where}: components.sampler: must be a string, got "
                            f"{short(comps.get('sampler'))}")
    req = {RECIPE_FILE, SCHEDULER_FILE, f"{TRANSFORMER_DIR}/{WEIGHTS_FILE}", f"{TRANSFORMER_DIR}/{QUANT_MAP_FILE}"}
    if cache != "none":
        req.add(SCHEDULE_FILE)
    if vc:
        req.add(VC_FILE)
    return req


def verify_artifact(root: Path, required: bool = False) -> dict:
    """Check format, version, every listed path and every file's checksum; return the manifest.

    ``required``: also check that the manifest lists every file its ``components`` call for (``required_files``).
    """
    root = Path(root)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"artifact: directory not found: {short_str(root)}")
    manifest = _read_manifest(mpath)
    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"artifact: {short_str(mpath)}: format is {short(manifest.get('format'))}, expected "
                            f"{FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"artifact: {short_str(mpath)}: unknown format_version "
                            f"{short(manifest.get('format_version'))} (this qcache {__version__} reads version "
                            f"{FORMAT_VERSION})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"artifact: {short_str(mpath)}: no file list")
    paths = {}
    for rel, digest in files.items():
        paths[rel] = check_listed_path(root, rel, mpath)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ArtifactError(f"artifact: {short_str(mpath)}: files.{short_str(rel)}: must be a sha256 (64 "
                                f"lowercase hex digits), got {short(digest)}")
    if required:
        for req in sorted(required_files(manifest, short_str(mpath))):
            if req not in files:
                raise ArtifactError(f"artifact: {short_str(root / req)} is not listed in the manifest (incomplete "
                                    f"or altered artifact)")
    for rel, digest in files.items():
        if sha256_file(paths[rel]) != digest:
            raise ArtifactError(f"artifact: checksum mismatch for {short_str(paths[rel])} (the file was modified "
                                f"or is corrupt)")
    return manifest


# ---- the compressed model's files ------------------------------------------------------------------------------
RECIPE_FILE = "recipe.yaml"
TRANSFORMER_DIR = "transformer"
WEIGHTS_FILE = "model.safetensors"  # qcache.quant.serialize.WEIGHTS_FILE
QUANT_MAP_FILE = "quant_map.json"  # qcache.quant.serialize.MAP_FILE
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
        (tmp / SCHEDULER_FILE).write_bytes(json_bytes(compressed.scheduler_config, default=str))
        if compressed.schedule is not None:
            (tmp / SCHEDULE_FILE).write_bytes(json_bytes(compressed.schedule.to_dict()))
        if compressed.vc_factors is not None:
            save_file({"factors": compressed.vc_factors.float().contiguous()}, str(tmp / VC_FILE),
                      metadata={"format": "qcache-vc/1"})
        cond = compressed.parts.conditioner
        if hasattr(cond, "prompts"):
            (tmp / PROMPTS_FILE).write_bytes(json_bytes({"prompts": cond.prompts,
                                                         "negative_prompt": cond.negative_prompt}, indent=1))
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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"artifact: {short_str(path)} is not valid JSON: {short_str(e, 120)}") from None
    except RecursionError:
        raise ArtifactError(f"artifact: {short_str(path)} is not valid JSON: nested too deeply") from None


def check_sampler_config(config: Any, scheduler: str, where: str) -> dict:
    """``config`` if it is a JSON object that diffusers builds the sampler ``scheduler`` (ddim, ...) from; else one line
    naming ``where`` (``qcache.models.loading.check_scheduler_config`` checks a model's own config by its class)."""
    from .sampling import make_scheduler

    if not isinstance(config, dict):
        raise QcacheError(f"{where}: must be a JSON object, got {type(config).__name__}")
    try:
        make_scheduler(scheduler, config)
    except Exception as e:  # diffusers raises ValueError, NotImplementedError, TypeError, ... for bad configs
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QcacheError(f"{where}: not accepted by diffusers for sampler {scheduler}: {short_str(msg)}") from None
    return config


def check_vc_factors(factors: Any, steps: int, channels: int, clamp: tuple[float, float], where: str) -> None:
    """VC factors must be a finite float32 tensor of shape (steps, channels) inside the recorded clamp range."""
    import torch

    if not isinstance(factors, torch.Tensor) or factors.dtype != torch.float32:
        raise ArtifactError(f"{where}: factors: must be a float32 tensor, got "
                            f"{getattr(factors, 'dtype', type(factors).__name__)}")
    if tuple(factors.shape) != (steps, channels):
        raise ArtifactError(f"{where}: factors: must have shape (steps, channels) = ({steps}, {channels}), got "
                            f"{tuple(factors.shape)}")
    if not bool(torch.isfinite(factors).all()):
        raise ArtifactError(f"{where}: factors: must be finite, found NaN or infinity")
    lo = float(torch.tensor(clamp[0], dtype=torch.float32))
    hi = float(torch.tensor(clamp[1], dtype=torch.float32))
    fmin, fmax = float(factors.min()), float(factors.max())
    if fmin < lo or fmax > hi:
        raise ArtifactError(f"{where}: factors: must lie in the recipe's clamp range [{clamp[0]}, {clamp[1]}] "
                            f"(vc.clamp_min, vc.clamp_max), got [{fmin:.6g}, {fmax:.6g}]")


def _check_prompts(pj: Any, where: str) -> tuple[list[str], str | None]:
    if not isinstance(pj, dict):
        raise ArtifactError(f"{where}: must be a JSON object, got {type(pj).__name__}")
    prompts, negative = pj.get("prompts"), pj.get("negative_prompt")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ArtifactError(f"{where}: prompts: must be a non-empty list of non-empty strings, got {short(prompts)}")
    if negative is not None and not isinstance(negative, str):
        raise ArtifactError(f"{where}: negative_prompt: must be a string or null, got {short(negative)}")
    return list(prompts), negative


def load_artifact(path: str | Path, device: str = "auto"):
    """Verify and load an artifact (or a compress output directory) into a ``CompressedModel``.

    The quantized transformer, schedule and VC factors come from the artifact; the conditioner's text encoders and
    the VAE of latent-space models come from the manifest's ``base_model`` (a local directory or a hub id). Every
    file read is listed in the manifest and checked (``verify_artifact``), and every value is validated before use.
    """
    from safetensors import safe_open

    from .cache import StaticSchedule
    from .compressed import CompressedModel
    from .models.loading import build_parts, resolve_device, resolve_location
    from .quant import load_quantized
    from .recipe import RecipeError, parse_yaml, recipe_from_dict

    root = resolve_artifact(path)
    manifest = verify_artifact(root, required=True)
    comps = manifest["components"]
    listed = set(manifest["files"])
    mpath = short_str(root / MANIFEST)
    rpath = root / RECIPE_FILE
    try:
        text = rpath.read_bytes().decode("utf-8")
        recipe = recipe_from_dict(parse_yaml(text, short_str(rpath)))
    except UnicodeDecodeError:
        raise ArtifactError(f"artifact: {short_str(rpath)} is not UTF-8 text") from None
    except RecipeError as e:
        raise ArtifactError(f"artifact: {short_str(rpath)} is not a valid recipe: {e}") from None
    sampling = recipe.sampling
    if comps["steps"] != sampling.steps or comps["sampler"] != sampling.scheduler:
        raise ArtifactError(f"artifact: {mpath}: components: made for {comps['sampler']} with {comps['steps']} "
                            f"steps, but {short_str(rpath)} samples {sampling.scheduler} with {sampling.steps}")
    spath = root / SCHEDULER_FILE
    scheduler_config = check_sampler_config(_read_json(spath), sampling.scheduler, f"artifact: {short_str(spath)}")
    schedule = None
    if SCHEDULE_FILE in listed:
        cpath = root / SCHEDULE_FILE
        where = f"artifact: {short_str(cpath)}"
        schedule = StaticSchedule.from_dict(_read_json(cpath), where=where)
        if schedule.steps != sampling.steps or schedule.sampler != sampling.scheduler:
            raise ArtifactError(f"{where}: made for {schedule.sampler} with {schedule.steps} steps, but the recipe "
                                f"samples {sampling.scheduler} with {sampling.steps} steps")
        if schedule.policy != comps["cache"]:
            raise ArtifactError(f"{where}: policy {schedule.policy!r} does not match the manifest's components.cache "
                                f"{comps['cache']!r}")
        if schedule.nfc != comps["nfc"]:
            raise ArtifactError(f"{where}: {schedule.nfc} full steps, the manifest's components.nfc says "
                                f"{comps['nfc']}")
    elif comps["nfc"] != sampling.steps:
        raise ArtifactError(f"artifact: {mpath}: components.nfc: {comps['nfc']} without a cache schedule, expected "
                            f"{sampling.steps}")
    factors = None
    if comps["vc"]:  # a listed VC file the components do not call for is never read
        vpath = root / VC_FILE
        try:
            with safe_open(str(vpath), framework="pt") as f:
                keys = list(f.keys())
                if keys != ["factors"]:
                    raise ArtifactError(f"artifact: {short_str(vpath)}: must hold exactly one tensor 'factors', got "
                                        f"{short(keys)}")
                factors = f.get_tensor("factors")
        except ArtifactError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(f"artifact: cannot read {short_str(vpath)}: {short_str(str(e).splitlines()[0])}") \
                from None
    prompts, negative = None, None
    if PROMPTS_FILE in listed:
        ppath = root / PROMPTS_FILE
        prompts, negative = _check_prompts(_read_json(ppath), f"artifact: {short_str(ppath)}")
    dev = resolve_device(recipe.model.device if device == "auto" else device)
    transformer = load_quantized(root / TRANSFORMER_DIR, device=dev)
    if factors is not None:
        from .families.registry import family_for

        channels = family_for(transformer).sample_shape(transformer)[0]  # the sampler's latent channels (FLUX unpacks)
        check_vc_factors(factors, sampling.steps, channels, (recipe.vc.clamp_min, recipe.vc.clamp_max),
                         f"artifact: {short_str(root / VC_FILE)}")
    base = manifest.get("base_model", "")
    if not isinstance(base, str):
        raise ArtifactError(f"artifact: {mpath}: base_model: must be a string, got {short(base)}")
    condition = recipe.condition
    if negative is not None:
        condition = dataclasses.replace(condition, negative_prompt=negative or None)
    use_vae = manifest.get("vae")
    if use_vae is not None and not isinstance(use_vae, bool):
        raise ArtifactError(f"artifact: {mpath}: vae: must be true or false, got {short(use_vae)}")
    from .families import family_for

    family = family_for(transformer)
    if family.text_conditioned and prompts is None:
        raise ArtifactError(f"artifact: {short_str(root / PROMPTS_FILE)} is not listed in the manifest (a "
                            f"text-conditional model's prompt list; incomplete or altered artifact)")
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
