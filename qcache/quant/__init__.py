"""Post-training quantization over optimum-quanto 0.2.7: presets, own observers, exact save/load.

    plan = plan_quantization(transformer, QuantConfig(preset="W8A8"))   # which module gets what
    quantize_transformer(transformer, cfg, calib)                        # observe, quantize, write scales, freeze
    save_quantized(transformer, "out/quantized")                         # safetensors + quant_map.json
    load_quantized("out/quantized")                                      # bit-identical outputs

``QuantConfig(backend="torchao")`` selects the speed backend (``torchao_backend``: dynamic int8/float8, compute
dtype, regional ``torch.compile``) through the same four functions; torchao is imported only then.
"""

from .kernels import (chosen_cpu_int_mm_route, cpu_int_mm, cpu_int_mm_route, exact_int_mm, forced_cpu_int_mm_route,
                      install_exact_cpu_int_mm)
from .observers import AbsmaxObserver, PercentileObserver, observe_ranges
from .plan import CONDITIONING_PATTERNS, KEEP_PATTERNS, PRESETS, plan_quantization
from .quantize import quantize_transformer, run_calibration
from .serialize import checkpoint_bytes, load_quantized, save_quantized
from .torchao_backend import compile_regions

install_exact_cpu_int_mm()  # bit-identical to torch._int_mm; ~30x faster on CPUs without int8 units, native on others

quantize_ = quantize_transformer  # torchao-style spelling: quantize_(model, QuantConfig(...), calib)

__all__ = [
    "chosen_cpu_int_mm_route", "cpu_int_mm", "cpu_int_mm_route", "exact_int_mm", "forced_cpu_int_mm_route",
    "install_exact_cpu_int_mm",
    "AbsmaxObserver", "PercentileObserver", "observe_ranges", "CONDITIONING_PATTERNS", "KEEP_PATTERNS", "PRESETS",
    "plan_quantization", "quantize_", "quantize_transformer", "run_calibration", "checkpoint_bytes", "load_quantized",
    "save_quantized", "compile_regions",
]
