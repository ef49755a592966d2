"""Shared fixtures: tiny random-weight diffusers DiTs built by the tests themselves (no downloads)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def tiny_dit(out_channels: int = 1, seed: int = 0, layers: int = 2):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1,
                                  out_channels=out_channels, num_layers=layers, sample_size=8, patch_size=2,
                                  num_embeds_ada_norm=10)
    # diffusers zero-initialises adaLN-Zero gates and the output layer; randomise so the model does something
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval().requires_grad_(False)


SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A diffusers pipeline-style directory (transformer/ + scheduler/) holding a tiny random DiT."""
    from diffusers import DDPMScheduler

    d = tmp_path / "tiny-dit"
    tiny_dit().save_pretrained(d / "transformer", safe_serialization=True)
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(d / "scheduler")
    return d


def run_module(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m ...`` as a user would, capturing output."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout)


def cli_error(p: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line of a failed qcache command (exit 2, no traceback), which ends its stderr.

    Lines before it can only be third-party import noise (e.g. a torchao build that does not match torch).
    """
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], p.stderr
    return errors[0]
