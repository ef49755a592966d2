"""The cache-aware calibration pool: the model inputs of every *full* step along sampled trajectories.

``PoolCollector`` is a sampler hook: it copies x_t at ``before_model`` and keeps it at ``after_step`` only if the
step was a full computation (``state.extras["full_step"]``, set by the cache engine after each model call; absent
= no cache = every step is full). Reading the flag after the step, not in ``after_model``, makes it independent of
the order of hooks. One row per image and full step: x (C, H, W) float32, timestep (int64; float32 for
flow-matching schedulers, whose timesteps are not integers), step_index, num_steps, the condition id (column
``class_label`` for class models, ``prompt_index`` into the recipe's prompt list for text models, re-encoded at
calibration time; CFG's null half is re-created then too), sample_id.
"""

from __future__ import annotations

import numpy as np
import torch

from qcache.sampling import Sampler, SamplerHook, StepState


class PoolCollector(SamplerHook):
    """Records (x_t, t, condition id, step index) of the full steps of every batch the sampler runs.

    ``column`` names the condition-id column (``Conditioner.column``).
    """

    def __init__(self, column: str = "class_label") -> None:
        self.column = column
        self.x: list[torch.Tensor] = []
        self.meta: list[np.ndarray] = []  # rows of (step_index, num_steps, condition id, sample_id)
        self.timesteps: list[np.ndarray] = []
        self._pending: tuple | None = None
        self._offset = 0

    def before_model(self, state: StepState) -> None:
        t = state.timestep
        t = float(t) if torch.is_floating_point(t) else int(t)
        self._pending = (state.latents.detach().float().cpu().clone(), t, state.index, state.num_steps)

    def after_step(self, state: StepState) -> None:
        if self._pending is None:
            return None
        x, t, i, steps = self._pending
        self._pending = None
        if state.extras.get("full_step", True):
            b = len(x)
            labels = state.class_labels.cpu().numpy()
            ids = np.arange(self._offset, self._offset + b)
            self.x.append(x)
            self.timesteps.append(np.full(b, t))
            self.meta.append(np.stack([np.full(b, i), np.full(b, steps), labels, ids], 1))
        return None

    def on_end(self, state: StepState) -> None:
        self._offset += len(state.class_labels)

    def to_dataset(self):
        """The collected rows as a ``datasets.Dataset`` (x as Array3D float32)."""
        from datasets import Array3D, Dataset, Features, Value

        if not self.x:
            raise ValueError("the pool is empty: no full step was recorded")
        x = torch.cat(self.x).numpy()
        meta = np.concatenate(self.meta).astype(np.int64)
        t = np.concatenate(self.timesteps)
        t_type = "float32" if np.issubdtype(t.dtype, np.floating) else "int64"
        features = Features({"x": Array3D(tuple(x.shape[1:]), "float32"), "timestep": Value(t_type),
                             "step_index": Value("int64"), "num_steps": Value("int64"),
                             self.column: Value("int64"), "sample_id": Value("int64")})
        cols = {"x": x, "timestep": t.astype(t_type),
                **{k: meta[:, j] for j, k in enumerate(["step_index", "num_steps", self.column, "sample_id"])}}
        return Dataset.from_dict(cols, features=features)


def collect_pool(sampler: Sampler, n: int, seed: int, labels: torch.Tensor | None = None,
                 progress: bool = False):
    """Sample ``n`` images with ``sampler`` (and whatever cache hook it carries) and return the pool Dataset.

    The sampler's own hooks run as usual; the collector is appended last for the duration of the call. Under
    several processes (``qcache.distributed``) each rank samples its batches of the same ``Sampler.sample`` call and
    rank 0 assembles the rows in batch order (the Dataset a single process builds); the others get None.
    """
    from qcache import distributed

    collector = PoolCollector(sampler.conditioner.column)
    d = distributed.current()
    if not d.active:
        with sampler.extra_hooks(collector):
            sampler.sample(n, seed=seed, labels=labels, progress=progress, desc="calibration pool")
        return collector.to_dataset()
    marks: dict[int, int] = {}

    def before(b: int, start: int) -> None:
        marks[b] = len(collector.x)
        collector._offset = start  # sample ids are global image indices, as in one process

    with sampler.extra_hooks(collector):
        distributed.run_batches(sampler, n, seed, labels, progress=progress, desc="calibration pool",
                                before=before)
    order = sorted(marks)
    rows = {}
    for b, nxt in zip(order, [*order[1:], None]):
        lo, hi = marks[b], (marks[nxt] if nxt is not None else len(collector.x))
        rows[b] = (collector.x[lo:hi], collector.timesteps[lo:hi], collector.meta[lo:hi])
    parts = d.gather_indexed(rows, len(distributed.split_batches(n, sampler.config.batch_size)))
    pool = None
    with d.guard():  # rank 0 assembles; an empty pool there stops every rank
        if parts is not None:
            whole = PoolCollector(sampler.conditioner.column)
            for x, t, meta in parts:
                whole.x += x
                whole.timesteps += t
                whole.meta += meta
            pool = whole.to_dataset()
    return pool
