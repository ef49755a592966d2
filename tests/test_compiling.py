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
