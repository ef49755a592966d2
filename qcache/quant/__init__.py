"""Post-training quantization over optimum-quanto 0.2.7: presets, own observers, exact save/load.

    plan = plan_quantization(transformer, QuantConfig(preset="W8A8"))   # which module gets what
    quantize_transformer(transformer, cfg, calib)                        # observe, quantize, write scales, freeze
    save_quantized(transformer, "out/quantized")                         # safetensors + quant_map.json
    load_quantized("out/quantized")                                      # bit-identical outputs

``QuantConfig(backend="torchao")`` selects the speed backend (``torchao_backend``: dynamic int8/float8, compute
dtype, regional ``torch.compile``) through the same four functions; torchao is imported only then.
"""

from .kernels import (
                      chosen_cpu_int_mm_route,
                      cpu_int_mm,
                      cpu_int_mm_route,
                      exact_cpu_int_mm,
                      exact_int_mm,
                      forced_cpu_int_mm_route,
                      use_exact_cpu_int_mm,
)
from .observers import AbsmaxObserver, PercentileObserver, observe_ranges
from .plan import CONDITIONING_PATTERNS, KEEP_PATTERNS, PRESETS, plan_quantization
from .quantize import quantize_transformer, run_calibration
from .serialize import checkpoint_bytes, load_quantized, save_quantized
from .torchao_backend import compile_regions

__all__ = [
    "chosen_cpu_int_mm_route", "cpu_int_mm", "cpu_int_mm_route", "exact_int_mm", "forced_cpu_int_mm_route",
    "exact_cpu_int_mm", "use_exact_cpu_int_mm",
    "AbsmaxObserver", "PercentileObserver", "observe_ranges", "CONDITIONING_PATTERNS", "KEEP_PATTERNS", "PRESETS",
    "plan_quantization", "quantize_transformer", "run_calibration", "checkpoint_bytes", "load_quantized",
    "save_quantized", "compile_regions",
]
