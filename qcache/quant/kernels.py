"""An exact, fast CPU replacement for the int8 x int8 GEMM behind quanto's W8A8 linears.

quanto 0.2.7 runs W8A8 on CPU through ``torch._int_mm``, which on CPUs without int8 matrix units (this project's
2-core machines) is ~35x slower than an fp32 matmul: a W8A8 digits model sampled 9x slower than fp32. The int32
result can be computed exactly with a float matmul: every partial sum is an integer of magnitude at most
K * 128 * 128, so float32 is exact for K <= 1024 (2^24) in any summation order; longer K is split into chunks of
1024 whose exact partial products are summed in int32. The output is therefore bit-identical to ``torch._int_mm``;
CUDA keeps quanto's own kernels. ``install_exact_cpu_int_scaled_mm`` does the same for torchao's CPU int8 path.
"""

from __future__ import annotations

import torch

_ORIGINAL = None
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


def _qbytes_int_mm(activations: torch.Tensor, weights: torch.Tensor, output_scales: torch.Tensor) -> torch.Tensor:
    if activations.device.type != "cpu":
        return _ORIGINAL(activations, weights, output_scales)
    out_features = weights.shape[0]
    out = exact_int_mm(activations.reshape(-1, activations.shape[-1]), weights.t())
    out = out.reshape(activations.shape[:-1] + (out_features,))
    return (out.to(torch.float32) * output_scales.t()).to(output_scales.dtype)


def install_exact_cpu_int_mm() -> None:
    """Route quanto's CPU int8 GEMM through ``exact_int_mm`` (idempotent)."""
    global _ORIGINAL
    from optimum.quanto.library import qbytes_mm as mod

    if _ORIGINAL is None:
        _ORIGINAL = mod.qbytes_int_mm
        mod.qbytes_int_mm = _qbytes_int_mm


_AO_ORIGINAL = None


def _ao_int_scaled_mm_cpu(a: torch.Tensor, b: torch.Tensor, scales1: torch.Tensor) -> torch.Tensor:
    return exact_int_mm(a, b).to(scales1.dtype) * scales1


def install_exact_cpu_int_scaled_mm() -> None:
    """Route torchao's CPU int8 x int8 GEMM (``torch._int_mm`` without VNNI/AMX units) through ``exact_int_mm``.

    Same integers, same rescaling, so bit-identical; idempotent. Needs torchao (imported here, not at start-up).
    """
    global _AO_ORIGINAL
    from torchao.kernel import intmm

    if _AO_ORIGINAL is None:
        _AO_ORIGINAL = intmm._int_scaled_matmul_cpu
        intmm._int_scaled_matmul_cpu = _ao_int_scaled_mm_cpu
