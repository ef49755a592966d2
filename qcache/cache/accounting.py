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
