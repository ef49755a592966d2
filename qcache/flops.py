"""Counting the floating-point operations a sampling run really executes (``torch.utils.flop_counter``)."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs executed by ``fn()`` (matmuls, convolutions, attention), counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
