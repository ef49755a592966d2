"""scikit-learn's handwritten digits as tensors in [-1, 1], with a fixed train / held-out split.

The embedded DiT and the evaluator's classifier train on the same ``train`` split; FID against data and the
classifier's own accuracy use the ``test`` split, which neither model has seen.
"""

from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SIZE = 8
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of one split: images ``(N, 1, 8, 8)`` float32 in [-1, 1], labels int64."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(data.target.astype(np.int64))
    if split == "all":
        return images, labels
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_test = int(round(TEST_FRACTION * len(labels)))
    idx = order[:n_test] if split == "test" else order[n_test:]
    idx_t = torch.from_numpy(np.sort(idx))
    return images[idx_t], labels[idx_t]
