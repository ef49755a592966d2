"""The cache-aware calibration pool: the model inputs of every *full* step along sampled trajectories.

``PoolCollector`` is a sampler hook: it copies x_t at ``before_model`` and keeps it at ``after_step`` only if the
step was a full computation (``state.extras["full_step"]``, set by the cache engine after each model call; absent
= no cache = every step is full). Reading the flag after the step, not in ``after_model``, makes it independent of
the order of hooks. One row per image and full step: x (C, H, W) float32, timestep, step_index, num_steps,
class_label (the conditional label; CFG's null half is re-created at calibration time), sample_id.
"""

from __future__ import annotations

import numpy as np
import torch

from qcache.sampling import Sampler, SamplerHook, StepState


class PoolCollector(SamplerHook):
    """Records (x_t, t, class, step index) of the full steps of every batch the sampler runs."""

    def __init__(self) -> None:
        self.x: list[torch.Tensor] = []
        self.meta: list[np.ndarray] = []  # rows of (timestep, step_index, num_steps, class_label, sample_id)
        self._pending: tuple | None = None
        self._offset = 0

    def before_model(self, state: StepState) -> None:
        self._pending = (state.latents.detach().float().cpu().clone(), int(state.timestep), state.index,
                         state.num_steps)

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
            self.meta.append(np.stack([np.full(b, t), np.full(b, i), np.full(b, steps), labels, ids], 1))
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
        features = Features({"x": Array3D(tuple(x.shape[1:]), "float32"), "timestep": Value("int64"),
                             "step_index": Value("int64"), "num_steps": Value("int64"),
                             "class_label": Value("int64"), "sample_id": Value("int64")})
        cols = {"x": x, **{k: meta[:, j] for j, k in enumerate(["timestep", "step_index", "num_steps",
                                                                  "class_label", "sample_id"])}}
        return Dataset.from_dict(cols, features=features)


def collect_pool(sampler: Sampler, n: int, seed: int, labels: torch.Tensor | None = None,
                 progress: bool = False):
    """Sample ``n`` images with ``sampler`` (and whatever cache hook it carries) and return the pool Dataset.

    The sampler's own hooks run as usual; the collector is appended last for the duration of the call.
    """
    collector = PoolCollector()
    with sampler.extra_hooks(collector):
        sampler.sample(n, seed=seed, labels=labels, progress=progress, desc="calibration pool")
    return collector.to_dataset()
