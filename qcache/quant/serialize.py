"""Save a quantized transformer as ``model.safetensors`` + ``quant_map.json`` and load it back bit-identically.

The JSON map holds the base model's class and config, the dtype, and for every quantized module its weight and
activation types and the explicit output-quantization decision. Unquantized float tensors are stored in
``keep_dtype`` when that is lossless (``quantize_transformer`` rounded them). Loading builds the base model with
empty parameters but real buffers (DiT's non-persistent ``pos_embed.pos_embed`` survives), swaps in the quanto
modules, re-applies the output decisions, loads the tensors strictly, and checks every tensor against the file.
A model quantized by the torchao speed backend (``format: qcache-torchao/1``) is written and read by
``torchao_serialize`` through the same two functions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..cli import json_bytes
from ..errors import QcacheError
from .kernels import use_exact_cpu_int_mm
from .plan import DTYPES
from .quantize import FORMAT, apply_plan, set_output_quantization
from .torchao_backend import FORMAT as AO_FORMAT  # torchao itself is imported only when used

WEIGHTS_FILE = "model.safetensors"
MAP_FILE = "quant_map.json"


def _storage_state_dict(model: torch.nn.Module, keep_dtype: str) -> dict[str, torch.Tensor]:
    from optimum.quanto import QTensor

    target = DTYPES[keep_dtype]
    floats = {n for n, p in model.named_parameters() if not isinstance(p.data, QTensor) and p.is_floating_point()}
    out = {}
    for k, v in model.state_dict().items():
        if v is None:  # quanto's affine-free norms; never produced by our plans, dropped to be safe
            continue
        v = v.detach().cpu().contiguous()
        if k in floats and target.itemsize < v.dtype.itemsize:
            low = v.to(target)
            if torch.equal(low.to(v.dtype), v):  # lossless only: reload must be bit-identical
                v = low
        out[k] = v
    if "time_groups" in getattr(model, "qcache_quant", {}):
        from .time_groups import group_state

        out.update(group_state(model))
    return out


def save_quantized(transformer: torch.nn.Module, directory: str | Path) -> Path:
    """Write the quantized transformer to ``directory`` (replaced atomically); returns the directory."""
    info = getattr(transformer, "qcache_quant", None)
    if info is None:
        raise QcacheError("save_quantized: the model was not quantized by qcache.quant.quantize_transformer")
    directory = Path(directory)
    qmap = {
        **{k: v for k, v in info.items() if k != "ranges"},
        "model_class": type(transformer).__name__,
        "model_config": json.loads(transformer.to_json_string()),
        "dtype": str(next(transformer.parameters()).dtype).removeprefix("torch."),
        "ranges": info.get("ranges", {}),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        if info.get("format") == AO_FORMAT:
            from .torchao_serialize import save_torchao

            save_torchao(transformer, tmp)
        else:
            save_file(_storage_state_dict(transformer, info["keep_dtype"]), str(tmp / WEIGHTS_FILE),
                      metadata={"format": FORMAT})
        (tmp / MAP_FILE).write_bytes(json_bytes(qmap))  # strict JSON: a non-finite range becomes null
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


MODEL_DTYPES = ("float32", "float16", "bfloat16")  # the dtypes a saved model (or its torchao compute) may name
WEIGHT_TYPES = {FORMAT: ("int8", "int4", "none"), AO_FORMAT: ("int8",)}
ACTIVATION_TYPES = ("int8", "none")


def _allowed_classes() -> tuple[str, ...]:
    from ..families.registry import supported_classes

    return tuple(supported_classes())


def validate_quant_map(qmap: object, path: Path) -> dict:
    """Check a quant map's values against allow-lists before anything is built from it: format, model class (a
    supported diffusers transformer), dtypes, module specs (names, weight/activation types, output decisions).
    Raises a one-line QcacheError naming the file and field."""
    from ..cli import short

    def bad(field: str, msg: str, value: object) -> QcacheError:
        return QcacheError(f"load_quantized: {path}: {field}: {msg}, got {short(value)}")

    if not isinstance(qmap, dict):
        raise QcacheError(f"load_quantized: {path}: must be a JSON object, got {type(qmap).__name__}")
    fmt = qmap.get("format")
    if fmt not in (FORMAT, AO_FORMAT):
        raise QcacheError(f"load_quantized: {path} has format {short(fmt)}, expected {FORMAT!r} or {AO_FORMAT!r}")
    classes = _allowed_classes()
    if qmap.get("model_class") not in classes:
        raise bad("model_class", f"must be one of {', '.join(classes)}", qmap.get("model_class"))
    if not isinstance(qmap.get("model_config"), dict):
        raise bad("model_config", "must be a JSON object", qmap.get("model_config"))
    if qmap.get("dtype", "float32") not in MODEL_DTYPES:
        raise bad("dtype", f"must be one of {', '.join(MODEL_DTYPES)}", qmap.get("dtype"))
    if qmap.get("keep_dtype") not in DTYPES:
        raise bad("keep_dtype", f"must be one of {', '.join(DTYPES)}", qmap.get("keep_dtype"))
    if fmt == AO_FORMAT:
        if qmap.get("compute_dtype") not in MODEL_DTYPES:
            raise bad("compute_dtype", f"must be one of {', '.join(MODEL_DTYPES)}", qmap.get("compute_dtype"))
        for key in ("compile", "float8"):
            if not isinstance(qmap.get(key, False), bool):
                raise bad(key, "must be true or false", qmap.get(key))
    modules = qmap.get("modules")
    if not isinstance(modules, dict):
        raise bad("modules", "must be a JSON object", modules)
    for name, spec in modules.items():
        where = f"modules.{short(name, 80)}"
        if not isinstance(name, str) or not name or not all(part.isidentifier() or part.isdigit()
                                                           for part in name.split(".")):
            raise bad("modules", "module names must be dotted attribute paths", name)
        if not isinstance(spec, dict):
            raise bad(where, "must be a JSON object", spec)
        if spec.get("weights") not in WEIGHT_TYPES[fmt]:
            raise bad(f"{where}.weights", f"must be one of {', '.join(WEIGHT_TYPES[fmt])}", spec.get("weights"))
        if spec.get("activations") not in ACTIVATION_TYPES:
            raise bad(f"{where}.activations", f"must be one of {', '.join(ACTIVATION_TYPES)}", spec.get("activations"))
        if not isinstance(spec.get("quantize_output", False), bool):
            raise bad(f"{where}.quantize_output", "must be true or false", spec.get("quantize_output"))
        if fmt == FORMAT and spec["activations"] != "none" and "quantize_output" not in spec:
            raise bad(f"{where}.quantize_output", "missing for an activation-quantized module", None)
    if "time_groups" in qmap:
        from .time_groups import check_map

        if fmt != FORMAT:
            raise bad("time_groups", "only the quanto format has time-grouped scales", qmap["time_groups"])
        check_map(qmap["time_groups"], _act_names(qmap), bad)
    return qmap


def _act_names(qmap: dict) -> list[str]:
    return [n for n, s in qmap["modules"].items() if s["activations"] != "none"]


def read_quant_map(directory: str | Path) -> dict:
    """Read and validate ``quant_map.json`` of a saved model directory."""
    path = Path(directory) / MAP_FILE
    try:
        qmap = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON and UTF-8 decoding errors
        raise QcacheError(f"load_quantized: cannot read {path}: {str(e)[:200]}") from None
    return validate_quant_map(qmap, path)


def _empty_base(qmap: dict) -> torch.nn.Module:
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, qmap["model_class"], None)
    if cls is None:
        raise QcacheError(f"load_quantized: unknown model class {qmap['model_class']!r}")
    try:
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (pos_embed) real
            return cls.from_config(qmap["model_config"])
    except Exception as e:  # a config diffusers cannot build the model from
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise QcacheError(f"load_quantized: model_config: {qmap['model_class']} cannot be built from it: "
                          f"{msg}") from None


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Give every meta parameter/buffer real (uninitialised) storage; real buffers are left untouched."""
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.device.type == "meta":
                m._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None and b.device.type == "meta":
                m._buffers[name] = torch.empty_like(b, device=device)


def load_quantized(directory: str | Path, base: Callable[[], torch.nn.Module] | torch.nn.Module | None = None,
                   device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load what ``save_quantized`` wrote; outputs are bit-identical to the saved model's.

    ``base`` builds the full-precision model skeleton (a callable or a module, whose weights are overwritten);
    by default it is rebuilt from the saved diffusers config with empty weights.
    """
    directory = Path(directory)
    qmap = read_quant_map(directory)
    device = torch.device(device)
    if qmap["format"] == AO_FORMAT:
        from .torchao_serialize import load_base, load_torchao

        return load_torchao(directory, qmap, load_base(qmap, base, _empty_base, _materialize), device)
    dtype = getattr(torch, qmap.get("dtype", "float32"))
    model = base() if callable(base) and not isinstance(base, torch.nn.Module) else base
    if model is None:
        model = _empty_base(qmap)
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype)
    plan = {n: {"weights": s["weights"], "activations": s["activations"]} for n, s in qmap["modules"].items()}
    try:
        apply_plan(model, plan)
    except AttributeError as e:
        raise QcacheError(f"load_quantized: the base model does not match {directory}: {e}") from None
    _materialize(model, torch.device("cpu"))
    set_output_quantization(model, {n: s["quantize_output"] for n, s in qmap["modules"].items()
                                    if s["activations"] != "none"})
    if "time_groups" in qmap:  # the per-group scales are buffers of the file: strict loading needs them present
        from .time_groups import register_group_buffers

        register_group_buffers(model, _act_names(qmap), qmap["time_groups"]["groups"])
    try:
        sd = load_file(str(directory / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types
        raise QcacheError(f"load_quantized: cannot read {directory / WEIGHTS_FILE}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise QcacheError(f"load_quantized: {directory / WEIGHTS_FILE} does not match the model: "
                          f"{str(e).splitlines()[0]} {str(e).splitlines()[1:2]}") from None
    loaded = model.state_dict()
    if "time_groups" in qmap:
        from .time_groups import group_state

        loaded.update(group_state(model))
    bad = [k for k, v in sd.items() if k not in loaded or not torch.equal(loaded[k].to(v.dtype), v)]
    if bad or set(loaded) - set(sd):
        raise QcacheError(f"load_quantized: tensors differ from {directory / WEIGHTS_FILE} after loading: "
                          f"{(bad or sorted(set(loaded) - set(sd)))[:3]}")
    model = use_exact_cpu_int_mm(model.to(device).eval().requires_grad_(False))
    model.qcache_quant = {k: v for k, v in qmap.items() if k not in ("model_config", "model_class", "dtype")}
    if "time_groups" in qmap:
        from .time_groups import attach

        attach(model, _act_names(qmap), qmap["time_groups"]["edges"])
    return model


def checkpoint_bytes(directory: str | Path) -> int:
    """Total size of the files of a saved model directory."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
