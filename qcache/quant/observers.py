"""Activation-range observers over the whole calibration set (not quanto's EMA, whose input momentum is fixed).

``observe_ranges`` hooks the named modules of a full-precision model, runs the calibration set through it once
(absmax) or twice (percentile: absmax, then a histogram on [0, absmax]) and returns each module's input and output
range. Ranges become quanto scales as ``range / 127``.

Data parallel: inside ``reduced_across(exchange)`` each process feeds its share of the calibration batches and
``observe_ranges`` merges the statistics of all processes after every pass (``state``/``merge``: max of absmax,
sum of histogram counts). Both are exact whatever the split: a max is order-free and the histogram counts are
integers held in float64, so every process ends with the ranges one process computes from all batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

HIST_BINS = 4096


class AbsmaxObserver:
    """Running max of |x| over everything fed to it: the exact absmax of the data."""

    passes = 1

    def __init__(self) -> None:
        self.absmax = 0.0

    def update(self, x: torch.Tensor, pass_index: int = 0) -> None:
        if x.numel():
            self.absmax = max(self.absmax, float(x.detach().abs().max()))

    def value(self) -> float:
        return self.absmax

    def state(self, pass_index: int) -> Any:
        """What pass ``pass_index`` accumulated, to be merged with other processes' (``merge``)."""
        return self.absmax

    def merge(self, states: list[Any], pass_index: int) -> None:
        """Replace this pass's statistics by the merge of every process's ``state`` (this one's included)."""
        self.absmax = max(states)


class PercentileObserver(AbsmaxObserver):
    """The q-th percentile of |x| over all data fed: pass 0 finds absmax, pass 1 fills a histogram on [0, absmax].

    The result is the upper edge of the histogram bin where the cumulative count reaches q %, so it is at most one
    bin width (absmax / 4096) above the exact percentile; q = 100 gives the exact absmax.
    """

    passes = 2

    def __init__(self, q: float, bins: int = HIST_BINS) -> None:
        super().__init__()
        self.q, self.bins = q, bins
        self.hist = torch.zeros(bins, dtype=torch.float64)

    def update(self, x: torch.Tensor, pass_index: int = 0) -> None:
        if pass_index == 0:
            return super().update(x)
        if self.absmax > 0 and x.numel():
            a = x.detach().abs().float().flatten()
            self.hist += torch.histc(a, bins=self.bins, min=0.0, max=self.absmax).double().cpu()

    def state(self, pass_index: int) -> Any:
        return self.absmax if pass_index == 0 else self.hist

    def merge(self, states: list[Any], pass_index: int) -> None:
        if pass_index == 0:
            self.absmax = max(states)
        else:  # integer counts in float64: the sum is exact in any order
            self.hist = torch.stack([torch.as_tensor(h, dtype=torch.float64) for h in states]).sum(0)

    def value(self) -> float:
        total = float(self.hist.sum())
        if self.q >= 100.0 or total == 0:
            return self.absmax
        cdf = torch.cumsum(self.hist, 0)
        k = int(torch.searchsorted(cdf, torch.tensor(self.q / 100.0 * total, dtype=torch.float64)))
        return min(self.absmax, (k + 1) * self.absmax / self.bins)


def make_observer(kind: str, percentile: float = 99.99) -> AbsmaxObserver:
    if kind == "absmax":
        return AbsmaxObserver()
    if kind == "percentile":
        return PercentileObserver(percentile)
    raise ValueError(f"quant.observer: must be 'absmax' or 'percentile', got {kind!r}")


# exchange(obj) -> every process's obj, in rank order (None for a process whose observations do not count)
_EXCHANGE: list[Callable[[Any], list[Any]]] = []


@contextlib.contextmanager
def reduced_across(exchange: Callable[[Any], list[Any]]) -> Iterator[None]:
    """Within: ``observe_ranges`` merges each pass's statistics across processes through ``exchange`` (every rank
    must call ``observe_ranges`` the same number of times, with the same module names)."""
    _EXCHANGE.append(exchange)
    try:
        yield
    finally:
        _EXCHANGE.pop()


def _merge_pass(observers: list[AbsmaxObserver], pass_index: int) -> None:
    if not _EXCHANGE:
        return
    states = _EXCHANGE[-1]([o.state(pass_index) for o in observers])
    counted = [s for s in states if s is not None]
    if not counted:
        raise ValueError("calibration: no process observed any calibration row")
    for j, o in enumerate(observers):
        o.merge([s[j] for s in counted], pass_index)


def observe_ranges(model: torch.nn.Module, names: list[str], run: Callable[[], None], kind: str = "absmax",
                   percentile: float = 99.99) -> dict[str, dict[str, float]]:
    """Feed the calibration set (``run()`` does one full pass) and return ``{name: {"input": r, "output": r}}``."""
    observers = {n: (make_observer(kind, percentile), make_observer(kind, percentile)) for n in names}
    passes = max((o[0].passes for o in observers.values()), default=0)
    for p in range(passes):
        handles = []
        for n in names:
            obs_in, obs_out = observers[n]
            mod = model.get_submodule(n)
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, o=obs_in, p=p: o.update(args[0], p)))
            handles.append(mod.register_forward_hook(
                lambda m, args, out, o=obs_out, p=p: o.update(out, p)))
        try:
            run()
        finally:
            for h in handles:
                h.remove()
        _merge_pass([o for n in names for o in observers[n]], p)
    return {n: {"input": o[0].value(), "output": o[1].value()} for n, o in observers.items()}
