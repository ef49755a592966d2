"""Data parallelism across processes: rank and world size, index splits, gathers, and errors that stop every rank.

Processes come from ``accelerate launch`` or ``torchrun``: both set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``,
which is all this module reads. A single process (no such variables) never touches ``torch.distributed`` and runs
exactly as before. With several, the process group uses gloo on CPU and NCCL (plus gloo for Python objects) on
CUDA, each rank on ``cuda:LOCAL_RANK``.

Work is split by *global index*: item i belongs to rank ``i % world_size``. Callers cut their work into fixed
chunks (the same batches a single process would run), so every chunk computes with the same shapes, seeds and
kernels whatever the number of processes, and the gathered result is bit-identical to one process's.

Errors: each guarded section (``Dist.guard``) ends with an exchange of every rank's status; an exception on any
rank becomes the same ``QcacheError`` on all of them. Only rank 0 reports it (``run_cli`` prints one ``error:``
line); the others exit with the same code silently (``main``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from .errors import QcacheError

# Rank 0 may compute metrics (or write a large file) while the others wait at a barrier: a long timeout.
DEFAULT_TIMEOUT_S = 4 * 3600


class PeerError(QcacheError):
    """An error raised on some rank, seen by every rank after a guarded section."""


@dataclass
class Dist:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None  # the gloo group of the object exchanges (None: the default group, itself gloo on CPU)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints results."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether there are several processes (and a process group)."""
        return self.world_size > 1

    # ---- splitting ------------------------------------------------------------------------------------------
    def mine(self, count: int) -> list[int]:
        """The indices in ``range(count)`` this rank handles: i with ``i % world_size == rank``."""
        return list(range(self.rank, count, self.world_size))

    def rounds(self, count: int) -> int:
        """Rounds of one item per rank needed for ``count`` items (equal on every rank)."""
        return -(-count // self.world_size)

    # ---- collectives ---------------------------------------------------------------------------------------
    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the others."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank; ``obj`` is ignored on the others. One process: ``obj``."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def scatter(self, objs: list[Any] | None) -> Any:
        """Item ``rank`` of rank 0's list ``objs`` (one picklable item per rank; ignored on the others)."""
        if not self.active:
            assert objs is not None
            return objs[0]
        import torch.distributed as dist

        out: list[Any] = [None]
        dist.scatter_object_list(out, objs if self.is_main else None, src=0, group=self.group)
        return out[0]

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on rank 0 alone (the others wait), its result broadcast to every rank; an error in it stops
        every rank (``guard``). For work that cannot be split without changing its numbers."""
        result = None
        with self.guard():
            if self.is_main:
                result = fn()
        return self.broadcast(result)

    def gather_indexed(self, items: dict[int, Any], count: int) -> list[Any] | None:
        """Assemble ``{global index: item}`` pieces of all ranks into one list of ``count`` items, on rank 0
        (None on the others). Every index in ``range(count)`` must be held by exactly one rank."""
        if not self.active:
            return [items[i] for i in range(count)]
        parts = self.gather(items)
        if parts is None:
            return None
        merged: dict[int, Any] = {}
        for p in parts:
            merged.update(p)
        missing = [i for i in range(count) if i not in merged]
        if missing:
            raise QcacheError(f"distributed: items {missing[:5]} were computed by no rank")
        return [merged[i] for i in range(count)]

    # ---- errors --------------------------------------------------------------------------------------------
    def check(self, error: BaseException | None) -> None:
        """Exchange every rank's status; if any rank failed, raise ``PeerError`` with the first failure."""
        if not self.active:
            if error is not None:
                raise error
            return
        msg = None if error is None else _one_line(error)
        statuses = self.all_gather(msg)
        for r, m in enumerate(statuses):
            if m is not None:
                raise PeerError(m if r == 0 else f"rank {r}: {m}") from None

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Run a section on every rank, then make every rank fail if any did (one process: errors pass through)."""
        if not self.active:
            yield
            return
        err: BaseException | None = None
        try:
            yield
        except PeerError:
            raise  # every rank saw it at the same exchange: no second one
        except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
            err = e
        self.check(err)

    def close(self) -> None:
        """Leave the process group."""
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(e, QcacheError) else f"{type(e).__name__}: {first}".rstrip(": ")


_STATE: Dist | None = None


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (0, 1, 0 without one)."""
    def num(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            raise QcacheError(f"{name}: must be an integer, got {os.environ[name]!r}") from None

    world = num("WORLD_SIZE", 1)
    rank = num("RANK", 0)
    local = num("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise QcacheError(f"RANK: must be in [0, WORLD_SIZE={world}), got {rank}")
    return rank, world, local


def init() -> Dist:
    """This process's ``Dist``; joins the process group on first call when launched with several processes."""
    global _STATE
    if _STATE is not None:
        return _STATE
    rank, world, local = env_world()
    if world > 1:
        import torch.distributed as dist

        use_cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in (
            "1", "true", "yes")
        if use_cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        timeout = datetime.timedelta(seconds=float(os.environ.get("QCACHE_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
        if not dist.is_initialized():
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo", timeout=timeout)
        # pickled objects (samples, statuses) travel through a gloo group on CPU whatever the device
        group = dist.new_group(backend="gloo", timeout=timeout) if use_cuda else None
        _STATE = Dist(rank, world, local, group)
        return _STATE
    _STATE = Dist(rank, world, local)
    return _STATE


def current() -> Dist:
    """The ``Dist`` of this process if ``init`` ran, else a single-process one (no group is created)."""
    return _STATE if _STATE is not None else Dist()


def shutdown() -> None:
    """Leave the process group and forget the state (tests run several launches in one interpreter)."""
    global _STATE
    if _STATE is not None:
        _STATE.close()
    _STATE = None


def main(entry: Callable[[], int | None]) -> NoReturn:
    """``run_cli`` for data-parallel entry points: rank 0 prints the one ``error:`` line, the others exit quietly."""
    from .cli import EXIT_USAGE, run_cli

    def wrapped() -> int | None:
        d = init()
        done = False
        try:
            result = entry()
            done = True
            return result
        except QcacheError:
            if not d.is_main:
                sys.exit(EXIT_USAGE)
            raise
        finally:
            if done:
                # leave together: a rank that tears gloo down while a peer still talks to it (rank 0 also hosts
                # the rendezvous store) can abort. Only after success: after an error a peer may never arrive.
                d.barrier()
            shutdown()

    run_cli(wrapped)


def split_batches(count: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the fixed chunks of ``batch_size`` items that cover ``range(count)``."""
    return [(s, min(s + batch_size, count)) for s in range(0, count, batch_size)]


def run_batches(sampler, n: int, seed: int | None = None, labels: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, progress: bool = True, desc: str = "sampling",
                before: Callable[[int, int], None] | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """This rank's batches of ``sampler.sample(n, seed, labels, noise)``: ``({batch index: x_0}, labels)``.

    The batches, noise, labels and per-batch generators are exactly ``Sampler.sample``'s; rank r runs the batches b
    with ``b % world_size == r`` (one process: all of them), each through ``sampler.denoise`` with the sampler's
    hooks. ``before(b, start)`` is called before batch b (whose first image has global index ``start``). Errors stop
    every rank (``guard``); no exchange happens here, so callers gather the pieces afterwards."""
    from tqdm.auto import tqdm

    from .sampling import make_noise

    d = current()
    seed = sampler.config.seed if seed is None else seed
    labels = sampler.conditioner.default_ids(n) if labels is None else labels.long().cpu()
    done: dict[int, torch.Tensor] = {}
    with d.guard():
        sampler.conditioner.check_ids(labels)
        noise = make_noise(n, sampler.sample_shape, seed) if noise is None else noise
        if len(labels) != n or len(noise) != n:
            raise ValueError(f"need {n} labels and noise tensors, got {len(labels)} and {len(noise)}")
        batches = split_batches(n, sampler.config.batch_size)
        mine = d.mine(len(batches))
        with tqdm(total=len(mine) * sampler.config.steps, desc=desc, disable=not (progress and d.is_main),
                  leave=False) as bar:
            for b in mine:
                start, end = batches[b]
                if before is not None:
                    before(b, start)
                gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + b + 1)
                done[b] = sampler.denoise(noise[start:end], labels[start:end], gen, bar)
    return done, labels


def sample_parallel(sampler, n: int, seed: int | None = None, labels: torch.Tensor | None = None,
                    progress: bool = True, desc: str = "sampling", noise: torch.Tensor | None = None):
    """``sampler.sample(n, seed, labels, noise)`` split over the processes by batch; the whole ``SampleSet`` on
    rank 0, None on the others. One process: exactly ``sampler.sample``. Several: rank r runs batches b with
    ``b % world_size == r``, with the same noise, labels and per-batch generator as ``Sampler.sample``, so the
    gathered set is bit-identical to a single process's."""
    from .sampling import SampleSet

    d = current()
    if not d.active:
        return sampler.sample(n, seed=seed, labels=labels, noise=noise, progress=progress, desc=desc)
    done, labels = run_batches(sampler, n, seed, labels, noise, progress, desc)
    parts = d.gather_indexed(done, len(split_batches(n, sampler.config.batch_size)))
    return None if parts is None else SampleSet(torch.cat(parts), labels)


def merge_cache_stats(stats, batches: int) -> None:
    """Make a cache's ``CacheStats`` hold the generations of every rank's batches in global batch order, on every
    rank (one generation per batch, as ``run_batches`` ran them): the NFC a single process would report."""
    d = current()
    if not d.active:
        return
    stats.end_generation()
    per_rank = d.all_gather(list(stats.generations))
    merged = []
    for b in range(batches):
        r, k = b % d.world_size, b // d.world_size
        if k >= len(per_rank[r]):
            raise QcacheError(f"distributed: rank {r} recorded no cache generation for batch {b}")
        merged.append(per_rank[r][k])
    stats.generations = merged

