"""The small CNN that judges digit samples: class accuracy, and the features FID is computed on.

Inception weights cannot be downloaded here, so FID on the embedded digits model uses the 64-d penultimate
features of this classifier, trained by ``tools/train_classifier.py`` on the digits' train split and shipped with
the package.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .errors import QcacheError

CLASSIFIER_PATH = Path(__file__).parent / "models" / "builtin" / "digits_classifier.safetensors"
FEATURE_DIM = 64


class DigitsCNN(nn.Module):
    """Two conv layers, one hidden linear layer (the feature layer), one output layer; input (N, 1, 8, 8)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@lru_cache(maxsize=1)
def load_classifier(path: str | None = None) -> DigitsCNN:
    """Load the shipped classifier (eval mode, CPU, float32)."""
    from safetensors.torch import load_file

    file = Path(path) if path else CLASSIFIER_PATH
    if not file.is_file():
        raise QcacheError(f"digits classifier: file not found: {file} (run tools/train_classifier.py)")
    model = DigitsCNN()
    model.load_state_dict(load_file(str(file)))
    return model.eval()


@torch.no_grad()
def classify(images: torch.Tensor, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(predicted labels, features)`` for images (N, 1, 8, 8) in [-1, 1]."""
    model = load_classifier()
    preds, feats = [], []
    for chunk in images.float().cpu().split(batch_size):
        f = model.features(chunk.clamp(-1, 1))
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(preds), torch.cat(feats)
