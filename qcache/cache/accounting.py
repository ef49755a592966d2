"""Accounting of a cache: NFC per generation, full-step masks, peak cache memory per image, executed FLOPs."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..flops import count_flops


@dataclass
class Generation:
    """One generation (one sampler batch): which steps were full, and the most cache memory held at once."""

    images: int | None
    mask: list[bool] = field(default_factory=list)
    peak_bytes: int = 0

    @property
    def nfc(self) -> int:
        return sum(self.mask)

    @property
    def full_steps(self) -> list[int]:
        return [i for i, f in enumerate(self.mask) if f]


class CacheStats:
    """Running record of the generations a cache has served since it was attached (or ``clear``-ed)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.generations: list[Generation] = []
        self.current: Generation | None = None

    def start_generation(self, images: int | None) -> None:
        self.end_generation()
        self.current = Generation(images)

    def end_generation(self) -> None:
        if self.current is not None and self.current.mask:
            self.generations.append(self.current)
        self.current = None

    def record_step(self, step: int, full: bool) -> None:
        mask = self.current.mask
        mask.extend([False] * (step + 1 - len(mask)))
        mask[step] = full

    def record_memory(self, nbytes: int) -> None:
        if self.current is not None:
            self.current.peak_bytes = max(self.current.peak_bytes, nbytes)

    def _done(self) -> list[Generation]:
        return self.generations + ([self.current] if self.current is not None and self.current.mask else [])

    def nfc_per_generation(self) -> list[int]:
        return [g.nfc for g in self._done()]

    def mean_nfc(self) -> float:
        n = self.nfc_per_generation()
        return sum(n) / len(n) if n else float("nan")

    def bytes_per_image(self) -> float:
        """Peak cache bytes of a generation divided by its images (model batch without CFG doubling)."""
        per = [g.peak_bytes / g.images for g in self._done() if g.images]
        return max(per) if per else float("nan")

    def report(self) -> dict:
        gens = self._done()
        return {
            "nfc": self.mean_nfc(),
            "nfc_per_generation": self.nfc_per_generation(),
            "full_steps": gens[-1].full_steps if gens else [],
            "steps": len(gens[-1].mask) if gens else 0,
            "cache_bytes_per_image": self.bytes_per_image(),
        }


def executed_flops(fn) -> tuple[object, int]:
    """Run ``fn()`` under torch's FLOP counter; returns (its result, FLOPs executed). Skipped modules count zero."""
    box = []
    flops = count_flops(lambda: box.append(fn()))
    return box[0], flops


def unit_state_bytes(mode: str, order: int, in_numel: int, out_numel: int, model_bytes: int, store_bytes: int) -> int:
    """Bytes one cached unit keeps per batch row once its state is full (``forecast.ModuleState``):

    - ``reuse`` (FORA): the last output;
    - ``forecast`` (TaylorSeer): the last output and ``order`` differences (in the store dtype);
    - ``rfe``: those, the last input, and per row RFE's scale (float64) and the differences' Gram matrix
      (order x order float64).

    A unit is a module's output (``cache.granularity: module``), a block's residual (``block``) or the cached span's
    residual (``span``); ``in_numel`` / ``out_numel`` are the elements per row of its input and of what is forecast.
    """
    if mode == "none":
        return 0
    n = out_numel * model_bytes
    if mode in ("forecast", "rfe"):
        n += order * out_numel * store_bytes
    if mode == "rfe":
        n += in_numel * model_bytes + 8 + order * order * 8
    return n


def rcs_state_bytes(order: int, watched_numel: int, model_bytes: int, store_bytes: int) -> int:
    """Bytes RCS's forecaster of the watched input keeps per batch row: the last input and ``order`` differences."""
    return watched_numel * model_bytes + order * watched_numel * store_bytes


def cache_bytes_per_image(units: list[tuple[int, int]], mode: str, order: int, model_bytes: int, store_bytes: int,
                          watched_numel: int | None = None, rows_per_image: int = 1) -> int:
    """Peak cache state per image: every unit's state plus RCS's (``watched_numel`` given), times the batch rows of
    one image (2 with classifier-free guidance). ``units``: (in_numel, out_numel) per unit and row. This is the
    formula of what ``FeatureCache.memory_bytes`` measures on the stored tensors (``CacheStats.bytes_per_image``)."""
    n = sum(unit_state_bytes(mode, order, i, o, model_bytes, store_bytes) for i, o in units)
    if watched_numel is not None:
        n += rcs_state_bytes(order, watched_numel, model_bytes, store_bytes)
    return n * rows_per_image
