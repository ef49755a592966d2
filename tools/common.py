"""What the tools share: the repository on ``sys.path``, logging, tables, JSON, error rows and model builders.

Every script imports this module first (``from common import ...``). Run as ``python tools/x.py`` Python puts
``tools/`` on the path, so this module is found and then puts the repository root in front of it: the checkout's
``qcache`` and ``calibration`` packages win over any installed copy. Run as ``python -m tools.x`` (or imported in the
tests) ``tools/__init__.py`` makes ``common`` importable the same way. Timing goes through ``qcache.evaluate``
(``wall_time``, ``interleaved_times``, ``time_interleaved``) so that every tool measures latency alike.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(REPO)]:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from qcache.cli import run_cli, write_json  # noqa: E402,F401 - re-exported for the scripts
from qcache.errors import QcacheError  # noqa: E402
from qcache.evaluate import interleaved_times, quality_metrics, time_interleaved, wall_time  # noqa: E402,F401
from qcache.metrics import compare_sets  # noqa: E402
from qcache.sampling import Sampler, SampleSet  # noqa: E402

DIGITS_RECIPE = REPO / "recipes" / "digits.yaml"

# errors one configuration of a benchmark may end with while the others still run: a target the model cannot meet
# (QcacheError), a kernel failure (RuntimeError), out of memory (torch's OOM errors are RuntimeErrors; MemoryError
# on CPU)
ROW_ERRORS: tuple[type[BaseException], ...] = (QcacheError, RuntimeError, MemoryError)


def log(msg: str, err: bool = False) -> None:
    """A timestamped progress line (stderr with ``err``, so that stdout keeps only the tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr if err else sys.stdout, flush=True)


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters of it): what an error row records."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def run_row(row: dict, fn: Callable[[], dict], label: str | None = None) -> dict:
    """``row`` updated with ``fn()``, or with ``{"error": ...}`` when ``fn`` fails with one of ``ROW_ERRORS``: one
    failing configuration is recorded in its row and the benchmark goes on with the next."""
    try:
        row.update(fn())
    except ROW_ERRORS as exc:
        row["error"] = one_line(exc)
        log(f"{label or row}: failed, recorded in its row ({row['error']})", err=True)
    return row


def fmt(v: Any, digits: int = 4) -> str:
    """A table cell: floats with ``digits`` significant digits, None as '-', infinities as 'inf'."""
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    return "inf" if math.isinf(v) else f"{v:.{digits}g}"


def markdown_table(rows: Iterable[dict], keys: Sequence[str], headers: Sequence[str] | None = None,
                   formats: dict[str, Callable[[Any], str]] | None = None) -> str:
    """Rows as a Markdown table of ``keys`` (missing values '-'); ``formats`` overrides the cell format per key."""
    formats = formats or {}
    lines = ["| " + " | ".join(headers or keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(formats.get(k, fmt)(r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def quality_key(rows: Iterable[dict]) -> str:
    """The quality figure summaries compare: ``fid_to_fp`` where the rows have it (digits judge), else ``psnr``."""
    return "fid_to_fp" if any(r.get("fid_to_fp") is not None and r.get("method", r.get("config")) not in ("FP", "fp")
                              for r in rows) else "psnr"


def better(key: str, a: float, b: float) -> bool:
    """Whether quality ``a`` is at least as good as ``b`` (FID: lower is better; PSNR, SSIM: higher)."""
    return a <= b if key.startswith("fid") else a >= b


# ---- a recipe's model, whatever its family -----------------------------------------------------------------------
@dataclass
class RecipeModel:
    """A recipe's full-precision model with its parts: conditioner (classes or prompts) and VAE decoder.

    The samplers it makes condition like the compress pipeline's, and ``compare`` measures images (latents decoded
    by the VAE) against a reference from the same noise: FID-to-FP where the digits judge applies, PSNR and SSIM
    always.
    """

    recipe: Any  # qcache.recipe.Recipe
    transformer: torch.nn.Module
    scheduler_config: dict
    parts: Any  # qcache.families.ModelParts

    @classmethod
    def load(cls, path: str | Path, source: str | None = None, device: str | None = None) -> RecipeModel:
        """The recipe at ``path``, with ``model.source`` / ``model.device`` overridden when given."""
        from qcache.models import load_model, load_parts
        from qcache.recipe import load_recipe

        recipe = load_recipe(str(path))
        over = {k: v for k, v in (("source", source), ("device", device)) if v is not None}
        if over:
            recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, **over))
        loaded = load_model(recipe.model)
        return cls(recipe, loaded.transformer, loaded.scheduler_config, load_parts(loaded, recipe.condition))

    @property
    def conditioner(self):
        return self.parts.conditioner

    def sampler(self, transformer: torch.nn.Module | None = None, **sampling) -> Sampler:
        """A sampler of ``transformer`` (default: the FP model), the recipe's sampling overridden by ``sampling``."""
        cfg = dataclasses.replace(self.recipe.sampling, **sampling) if sampling else self.recipe.sampling
        return Sampler(self.transformer if transformer is None else transformer, self.scheduler_config, cfg,
                       conditioner=self.parts.conditioner)

    def pixels(self, samples: SampleSet) -> SampleSet:
        """Images in [-1, 1]: latent samples decoded by the VAE, pixel samples as they are."""
        return SampleSet(self.parts.to_pixels(samples.images), samples.labels)

    def compare(self, reference: SampleSet, samples: SampleSet) -> dict:
        """FID-to-FP (None off the digits judge), PSNR and SSIM against ``reference`` (pixel images, same noise),
        plus class accuracy and FID against data (None without a judge)."""
        return {**compare_sets(reference.images, samples.images), **quality_metrics(samples, self.parts.conditioner)}


# ---- random-weight DiTs (speed does not depend on the weights) ---------------------------------------------------
FULL = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=32)  # DiT-XL/2, 256x256
MID = dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, sample_size=32)  # DiT-S/2, 256x256
COMMON = dict(in_channels=4, out_channels=8, patch_size=2, num_embeds_ada_norm=1000)
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


def random_dit(dims: dict, seed: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A ``DiTTransformer2DModel`` of ``dims`` (+ ``COMMON``) with normal(0, 0.02) weights everywhere, so that no
    adaLN-Zero gate is zero and every path works."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**dims, **COMMON)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval().requires_grad_(False).to(device)


def named_model(name: str) -> tuple[torch.nn.Module, dict]:
    """(transformer, scheduler config) of ``digits`` (the embedded model, fp32, CPU) or ``mid`` (random DiT-S/2 at
    256x256, fp32, CPU)."""
    if name == "digits":
        from qcache.models import load_model
        from qcache.recipe import ModelConfig

        loaded = load_model(ModelConfig(source="builtin:digits", device="cpu"))
        return loaded.transformer, loaded.scheduler_config
    if name == "mid":
        return random_dit(MID, 0), SCHEDULER
    raise QcacheError(f"--model: unknown model {name!r} (choose from digits, mid)")
