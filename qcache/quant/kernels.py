"""An exact, fast CPU path for quanto's W8A8 linears: the int8 x int8 GEMM, and the work around it.

quanto 0.2.7 runs W8A8 on CPU through ``torch._int_mm``, which on CPUs without int8 matrix units (this project's
2-core machines) is ~35x slower than an fp32 matmul: a W8A8 digits model sampled 9x slower than fp32. The int32
result can be computed exactly with a float matmul: every partial sum is an integer of magnitude at most
K * 128 * 128, so float32 is exact for K <= 1024 (2^24) in any summation order; longer K is split into chunks of
1024 whose exact partial products are summed in int32. The output is therefore bit-identical to ``torch._int_mm``;
CUDA keeps quanto's own kernels; torchao's CPU int8 path gets the same treatment. The swap is scoped:
``exact_cpu_int_mm`` is a context manager, and ``use_exact_cpu_int_mm`` runs a quantized model's forwards inside
it (qcache calls it where it builds or loads a quantized model); importing qcache patches nothing.

CPUs with int8 dot-product units (AVX512-VNNI, AMX) run ``torch._int_mm`` itself several times faster than an
fp32 matmul (docs/speed.md). Both routes give the same integers, so the choice is speed only:
``chosen_cpu_int_mm_route`` times each once per process on a DiT-sized GEMM
and keeps the faster; the environment variable ``QCACHE_CPU_INT_MM`` (``auto``, ``native`` or ``float``) overrides
it, and ``forced_cpu_int_mm_route`` overrides both inside a ``with`` block.

Around the GEMM, quanto's eager CPU path allocates an activation-sized tensor per elementwise step: dividing by the
activation scale, rounding, clamping and casting the input; casting the int32 product to float and scaling it;
adding the bias. On the digits model that work took twice as long as the int8 GEMMs themselves (docs/speed.md).
Inside the same scope, ``quantize_activation_int8`` rounds and clamps in place, the int32 product is scaled in one
promoting multiply, and the bias is added in place: the same operations in the same order, so the same bits
(``tests/test_quant.py``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

import torch

from ..errors import QcacheError

ROUTE_ENV = "QCACHE_CPU_INT_MM"
ROUTES = ("auto", "native", "float")
PROBE_SHAPE = (1024, 384, 1152)  # (M, K, N): one DiT-S qkv projection's worth of tokens
_FORCED: str | None = None  # set by forced_cpu_int_mm_route
EXACT_FP32_K = 2**24 // (128 * 128)  # 1024


def exact_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm(a, b)`` for int8 (M, K) x (K, N), computed exactly through a float matmul."""
    k = a.shape[-1]
    if k <= EXACT_FP32_K:
        return torch.matmul(a.to(torch.float32), b.to(torch.float32)).to(torch.int32)
    out = None
    for start in range(0, k, EXACT_FP32_K):  # each chunk's float32 sum is exact; chunks add up in int32
        part = torch.matmul(a[:, start:start + EXACT_FP32_K].to(torch.float32),
                            b[start:start + EXACT_FP32_K].to(torch.float32)).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


def _best_of(fn, repeats: int = 3) -> float:
    fn()  # first call outside the clock (lazy initialisation, page faults)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def chosen_cpu_int_mm_route() -> str:
    """``native`` (``torch._int_mm``) or ``float`` (``exact_int_mm``): the faster of the two on this CPU, timed once
    per process (a few ms), unless ``QCACHE_CPU_INT_MM`` names one. Both give bit-identical results."""
    route = os.environ.get(ROUTE_ENV, "auto").strip().lower() or "auto"
    if route not in ROUTES:
        raise QcacheError(f"{ROUTE_ENV}: must be one of {', '.join(ROUTES)}, got {route!r}")
    if route != "auto":
        return route
    m, k, n = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen)
    native = _best_of(lambda: torch._int_mm(a, b))
    emulated = _best_of(lambda: exact_int_mm(a, b))
    return "native" if native < emulated else "float"


def cpu_int_mm_route() -> str:
    """The route CPU int8 GEMMs take now: a ``forced_cpu_int_mm_route`` block's, else the process's choice."""
    return _FORCED or chosen_cpu_int_mm_route()


@contextlib.contextmanager
def forced_cpu_int_mm_route(route: str) -> Iterator[None]:
    """Run the block's CPU int8 GEMMs by ``route`` (``native`` or ``float``), leaving the process's choice as it is:
    for benchmarks and tests that compare the two."""
    global _FORCED
    if route not in ("native", "float"):
        raise QcacheError(f"forced_cpu_int_mm_route: route must be native or float, got {route!r}")
    previous, _FORCED = _FORCED, route
    try:
        yield
    finally:
        _FORCED = previous


def cpu_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm(a, b)`` on CPU by the faster route (``cpu_int_mm_route``); same integers either way."""
    return torch._int_mm(a, b) if cpu_int_mm_route() == "native" else exact_int_mm(a, b)


def _qbytes_int_mm(activations: torch.Tensor, weights: torch.Tensor, output_scales: torch.Tensor) -> torch.Tensor:
    if activations.device.type != "cpu":
        return _ORIGINALS["quanto"](activations, weights, output_scales)
    out_features = weights.shape[0]
    out = cpu_int_mm(activations.reshape(-1, activations.shape[-1]), weights.t())
    out = out.reshape(activations.shape[:-1] + (out_features,))
    if output_scales.dtype == torch.float32:  # int32 x float32 promotes in the multiply: one pass, same values
        return torch.mul(out, output_scales.t())
    return (out.to(torch.float32) * output_scales.t()).to(output_scales.dtype)


def quantize_activation_int8(base: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.int8
                             ) -> torch.Tensor:
    """quanto's per-tensor symmetric activation quantization, ``clamp(round(base / scale)).to(dtype)``, with one
    temporary instead of three (rounded and clamped in place): bit-identical, and on CPU, where a W8A8 linear of
    the digits model spent twice as long quantizing its input as in the int8 GEMM itself, cheaper."""
    info = torch.iinfo(dtype)
    data = base / scale
    return data.round_().clamp_(info.min, info.max).to(dtype)


def _activation_quantizer_forward(ctx, base: torch.Tensor, qtype, scale: torch.Tensor) -> torch.Tensor:
    """``ActivationQBytesQuantizer.forward`` of quanto 0.2.7 with ``quantize_activation_int8`` on CPU int8."""
    if base.device.type != "cpu" or qtype.dtype != torch.int8 or scale.numel() != 1:
        return _ORIGINALS["quanto_activations"].__func__(ctx, base, qtype, scale)
    from optimum.quanto.tensor.activations.qbytes import ActivationQBytesTensor

    data = quantize_activation_int8(base, scale, qtype.dtype)
    return ActivationQBytesTensor(qtype, base.size(), base.stride(), data, scale)


def _activation_quantizer():
    from optimum.quanto.tensor.activations.qbytes import ActivationQBytesQuantizer

    return ActivationQBytesQuantizer


def _linear_function():
    from optimum.quanto.tensor.weights.qbytes import WeightQBytesLinearFunction

    return WeightQBytesLinearFunction


def _qbytes_linear_forward(ctx, input: torch.Tensor, other: torch.Tensor, bias: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """``WeightQBytesLinearFunction.forward`` of quanto 0.2.7 for inference on CPU: the bias is added in place to
    the GEMM's fresh output instead of into another activation-sized tensor (the same sum)."""
    from optimum.quanto.tensor import QBytesTensor

    if input.device.type != "cpu" or torch.is_grad_enabled() and (input.requires_grad or other.requires_grad):
        return _ORIGINALS["quanto_linear"].__func__(ctx, input, other, bias)
    if isinstance(input, QBytesTensor):
        output = torch.ops.quanto.qbytes_mm(input._data, other._data, input._scale * other._scale)
    else:
        output_shape = input.shape[:-1] + (other.shape[0],)
        output = torch.ops.quanto.qbytes_mm(input.reshape(-1, input.shape[-1]), other._data, other._scale)
        output = output.reshape(output_shape)
    if bias is not None:
        output = output.add_(bias) if output.dtype == torch.promote_types(output.dtype, bias.dtype) else output + bias
    return output


def _ao_int_scaled_mm_cpu(a: torch.Tensor, b: torch.Tensor, scales1: torch.Tensor) -> torch.Tensor:
    if cpu_int_mm_route() == "native":  # torchao's own CPU path (it picks u8s8 on VNNI, s8s8 on AMX)
        return _ORIGINALS["torchao"](a, b, scales1)
    return exact_int_mm(a, b).to(scales1.dtype) * scales1


def _targets() -> list[tuple[str, object, str, Callable]]:
    """(key, module, attribute, replacement) of every library function the exact route stands in for."""
    from optimum.quanto.library import qbytes_mm

    out = [("quanto", qbytes_mm, "qbytes_int_mm", _qbytes_int_mm),
           ("quanto_activations", _activation_quantizer(), "forward", staticmethod(_activation_quantizer_forward)),
           ("quanto_linear", _linear_function(), "forward", staticmethod(_qbytes_linear_forward))]
    if "torchao" in sys.modules:  # only when the torchao backend is in use: never imported from here
        try:
            from torchao.kernel import intmm
        except ImportError:
            pass
        else:
            out.append(("torchao", intmm, "_int_scaled_matmul_cpu", _ao_int_scaled_mm_cpu))
    return out


_ORIGINALS: dict[str, Callable] = {}
_DEPTH = 0
_LOCK = threading.RLock()


@contextlib.contextmanager
def exact_cpu_int_mm() -> Iterator[None]:
    """Inside the block, quanto's CPU int8 GEMM (and torchao's, when torchao is loaded) run through ``cpu_int_mm``,
    and quanto's activation quantizer and int8 linear through their leaner CPU versions above; the libraries' own
    functions (and class attributes) are back on exit (re-entrant: the outermost block restores them).

    quanto 0.2.7 looks its CPU kernel up as a module global, and its autograd functions' ``forward`` on the class,
    at call time, so the swap reaches every call made inside the block and nothing outside it. Results are
    bit-identical either way; only the speed differs.
    """
    global _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            for key, mod, attr, fn in _targets():
                _ORIGINALS[key] = inspect.getattr_static(mod, attr)  # a class's staticmethod object as it is
                setattr(mod, attr, fn)
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                for key, mod, attr, _ in _targets():
                    if key in _ORIGINALS:
                        setattr(mod, attr, _ORIGINALS.pop(key))


_SCOPE_ATTR = "_qcache_exact_int_mm"


def use_exact_cpu_int_mm(model: torch.nn.Module) -> torch.nn.Module:
    """Run every forward of ``model`` inside ``exact_cpu_int_mm`` (forward hooks; idempotent); returns ``model``.

    Called where quantized models are built or loaded, so the route applies to qcache's models and to nothing
    else in the process.
    """
    if getattr(model, _SCOPE_ATTR, False):
        return model
    scopes: list[contextlib.AbstractContextManager] = []

    def enter(module, args):
        scope = exact_cpu_int_mm()
        scope.__enter__()
        scopes.append(scope)

    def leave(module, args, output):
        if scopes:
            scopes.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
    setattr(model, _SCOPE_ATTR, True)
    return model
