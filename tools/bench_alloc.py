"""Why qcache's CLIs keep freed memory (qcache/memory.py): the cost of a fresh activation-sized tensor on CPU.

    python tools/bench_alloc.py [--mb 6] [--keep-freed-memory]

Times ``a - b`` for two float32 tensors of ``--mb`` megabytes while up to 30 earlier results stay alive and are
then freed together (as a step's activations are), against the same subtraction into a reused output, median of
200. With glibc's default thresholds every fresh result is mmap-ed and page-faulted in; ``--keep-freed-memory`` applies
``qcache.memory.keep_freed_memory`` first.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import interleaved_times, run_cli

from qcache.memory import keep_freed_memory  # noqa: E402


def median_us(fn, n: int = 200) -> float:
    """Median microseconds of ``fn`` over n calls, after 10 untimed ones."""
    return statistics.median(interleaved_times([fn], n, warmup=[fn] * 10)[0]) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=6.0)
    ap.add_argument("--keep-freed-memory", action="store_true")
    args = ap.parse_args()
    if args.keep_freed_memory:
        print("keep_freed_memory:", keep_freed_memory())
    numel = int(args.mb * 2**20 / 4)
    a, b, out = torch.randn(numel), torch.randn(numel), torch.empty(numel)
    live: list[torch.Tensor] = []

    def fresh() -> None:
        live.append(a - b)
        if len(live) == 30:  # a step's worth of activations, freed together
            live.clear()

    f, r = median_us(fresh), median_us(lambda: torch.sub(a, b, out=out))
    print(f"{args.mb:g} MB: fresh result {f:.0f} us, reused output {r:.0f} us, ratio {f / r:.1f}x")


if __name__ == "__main__":
    run_cli(main)
