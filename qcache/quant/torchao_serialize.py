"""Save / load a torchao-quantized transformer: ``model.safetensors`` + ``quant_map.json``, bit-identical reload.

The state dict is flattened with torchao's safetensors support (each ``Int8Tensor``/``Float8Tensor`` weight becomes
its plain data tensors, ``qdata``/``scale``..., plus a JSON description in the safetensors metadata), so nothing is
pickled. Unquantized float tensors are stored in ``keep_dtype`` when that is lossless. Loading rebuilds the model
skeleton from the saved diffusers config (or ``base``), assigns the saved tensors, checks every one of them against
the file, then moves the model to the device and re-applies ``torch.compile`` if the map says so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import QcacheError
from .kernels import use_exact_cpu_int_mm
from .plan import DTYPES
from .torchao_backend import FORMAT, compile_regions, require_torchao

WEIGHTS_FILE = "model.safetensors"


def _is_subclass(t: torch.Tensor) -> bool:
    return type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter


def flat_state(model: torch.nn.Module, keep_dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(plain tensors, safetensors metadata) of ``model``'s state dict; lossless ``keep_dtype`` storage."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    target = DTYPES[keep_dtype]
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if not _is_subclass(v):
            v = v.cpu().contiguous()
            if (v.is_floating_point() and target.itemsize < v.dtype.itemsize
                    and torch.equal(v.to(target).to(v.dtype), v)):
                v = v.to(target)
        else:
            v = v.to("cpu")
        sd[k] = v
    data, meta = flatten_tensor_state_dict(sd)
    return {k: v.contiguous() for k, v in data.items()}, meta


def save_torchao(transformer: torch.nn.Module, tmp: Path) -> None:
    """Write ``model.safetensors`` of a torchao-quantized model into the (temporary) directory ``tmp``."""
    require_torchao()
    info = transformer.qcache_quant
    data, meta = flat_state(transformer, info["keep_dtype"])
    save_file(data, str(tmp / WEIGHTS_FILE), metadata={**meta, "format": FORMAT})


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises its own error types
        raise QcacheError(f"load_quantized: cannot read {path}: {str(e).splitlines()[0]}") from None


def load_torchao(directory: Path, qmap: dict, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Load what ``save_torchao`` wrote into ``model`` (a skeleton of the right architecture, any weights)."""
    require_torchao()
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    path = directory / WEIGHTS_FILE
    data, meta = _read(path)
    if meta.get("format") != FORMAT:
        raise QcacheError(f"load_quantized: {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    meta.pop("format")
    sd, leftover = unflatten_tensor_state_dict(data, meta)
    if leftover:
        raise QcacheError(f"load_quantized: {path} holds tensors that belong to no state entry: {sorted(leftover)[:3]}")
    dtype = getattr(torch, qmap["compute_dtype"])
    sd = {k: v if _is_subclass(v) or not v.is_floating_point() else v.to(dtype) for k, v in sd.items()}
    torch.nn.Module.to(model, dtype)  # (diffusers' own .to() warns about dtype casts)
    expected = set(model.state_dict())
    if set(sd) != expected:
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise QcacheError(f"load_quantized: {path} does not match the model: missing {missing[:3]}, "
                          f"unexpected {extra[:3]}")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise QcacheError(f"load_quantized: {path} does not match the model: {str(e).splitlines()[0]}") from None
    check_against_file(model, qmap["keep_dtype"], data, path)
    model = use_exact_cpu_int_mm(model.to(device).eval().requires_grad_(False))
    model.qcache_quant = {k: v for k, v in qmap.items() if k not in ("model_config", "model_class", "dtype")}
    if qmap.get("compile"):
        compile_regions(model)
    return model


def check_against_file(model: torch.nn.Module, keep_dtype: str, data: dict[str, torch.Tensor], path: Path) -> None:
    """Every flattened tensor of the loaded model equals the file's, in dtype and value."""
    now, _ = flat_state(model, keep_dtype)
    bad = [k for k, v in data.items() if k not in now or now[k].dtype != v.dtype or not torch.equal(now[k], v)]
    if bad or set(now) - set(data):
        raise QcacheError(f"load_quantized: tensors differ from {path} after loading: "
                          f"{(bad or sorted(set(now) - set(data)))[:3]}")


def load_base(qmap: dict, base: Callable[[], torch.nn.Module] | torch.nn.Module | None,
              empty_base: Callable[[dict], torch.nn.Module],
              materialize: Callable[[torch.nn.Module, torch.device], None]) -> torch.nn.Module:
    """The skeleton to load into: ``base`` (callable or module) or an empty model from the saved config."""
    model = base() if callable(base) and not isinstance(base, torch.nn.Module) else base
    if model is None:
        model = empty_base(qmap)
        materialize(model, torch.device("cpu"))
    return model

