"""An exact, fast CPU replacement for the int8 x int8 GEMM behind quanto's W8A8 linears.

quanto 0.2.7 runs W8A8 on CPU through ``torch._int_mm``, which on CPUs without int8 matrix units (this project's
2-core machines) is ~35x slower than an fp32 matmul: a W8A8 digits model sampled 9x slower than fp32. The int32
result can be computed exactly with a float matmul: every partial sum is an integer of magnitude at most
K * 128 * 128, so float32 is exact for K <= 1024 (2^24) in any summation order, float64 beyond. The output is
therefore bit-identical to ``torch._int_mm``; CUDA keeps quanto's own kernels.
"""

from __future__ import annotations

import torch

_ORIGINAL = None
EXACT_FP32_K = 2**24 // (128 * 128)  # 1024


def exact_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm(a, b)`` for int8 (M, K) x (K, N), computed exactly through a float matmul."""
    dtype = torch.float32 if a.shape[-1] <= EXACT_FP32_K else torch.float64
    return torch.matmul(a.to(dtype), b.to(dtype)).to(torch.int32)


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
