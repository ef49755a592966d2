"""qcache.compiling: a compiled function keeps compiling past dynamo's default cap of 8 signatures."""

from __future__ import annotations

import torch
import torch._dynamo.config as dynamo_config
from torch._dynamo.utils import counters

from qcache.compiling import RECOMPILE_LIMIT, compile_fn


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_more_signatures_than_the_default_cap_all_compile():
    def affine(x: torch.Tensor, eps: float) -> torch.Tensor:
        return x * 2 + eps

    fn = compile_fn(affine, backend="eager")
    before, limit = _graphs(), dynamo_config.recompile_limit
    sigs = [(torch.ones(n), e) for n in range(1, 7) for e in (1e-5, 1e-6)]  # 12 shapes x constants
    for x, e in sigs:
        assert torch.equal(fn(x, e), x * 2 + e)
    assert _graphs() - before == len(sigs) > 8  # plain torch.compile stops at 8 and runs the rest eagerly
    assert dynamo_config.recompile_limit == limit < RECOMPILE_LIMIT  # the process's own setting is untouched


def test_plain_torch_compile_would_stop_at_the_cap():
    """The failure compile_fn exists for (if dynamo ever lifts its cap, this test says so)."""
    fn = torch.compile(lambda x: x + 1, dynamic=False, backend="eager")
    before = _graphs()
    for n in range(1, 13):
        fn(torch.ones(n))
    assert _graphs() - before == dynamo_config.recompile_limit


def test_a_first_call_under_the_flop_counter_leaves_the_function_compilable():
    """Dynamo gives up for good on a frame it first meets under a dispatch mode: compile_fn runs eagerly there
    (FLOPs are still counted) and compiles on the next plain call."""
    from torch.utils.flop_counter import FlopCounterMode

    def matmul_plus(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b + 1

    fn = compile_fn(matmul_plus, backend="eager")
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    want = a @ b + 1
    before = _graphs()
    with FlopCounterMode(display=False) as counter:
        got = fn(a, b)
    assert torch.equal(got, want) and counter.get_total_flops() == 2 * 4 * 8 * 3
    assert _graphs() == before  # nothing was traced under the mode
    assert torch.equal(fn(a, b), want)
    assert _graphs() - before == 1  # the plain call compiled


def test_plain_torch_compile_gives_up_after_a_call_under_the_flop_counter():
    """The failure that test guards against (if dynamo ever stops doing this, this test says so)."""
    from torch.utils.flop_counter import FlopCounterMode

    fn = torch.compile(lambda x: x * 3 - 1, dynamic=False, backend="eager")
    before = _graphs()
    with FlopCounterMode(display=False):
        fn(torch.ones(5))
    fn(torch.ones(5))
    fn(torch.ones(6))
    assert _graphs() == before
