"""Conditions: what a model is conditioned on, as one batched object, and the conditioners that make them.

A *condition* is a batch of class labels (``ClassCondition``) or of text embeddings with their attention masks and
pooled embeddings (``TextCondition``). A *conditioner* maps integer condition ids to conditions and gives the null
(unconditional) condition of classifier-free guidance: for class models an id is a class label, for text models an
index into a prompt list whose embeddings the conditioner holds. Integer ids are what flows through the sampler,
the calibration pool (column ``Conditioner.column``) and ``SampleSet.labels``, so a pool row stays small and a
calibration pass re-creates the exact condition of the sampled trajectory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import QcacheError
from .dedup import RowGroups, equal_rows


class Condition:
    """Base of batched conditions: ``len``, row selection, device/dtype moves, and concatenation (for CFG)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def select(self, idx: torch.Tensor) -> Condition:
        raise NotImplementedError

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Condition:
        raise NotImplementedError

    def cat(self, other: Condition) -> Condition:
        raise NotImplementedError

    def with_guidance(self, scale: float) -> Condition:
        """The same condition with an embedded guidance scale (guidance-distilled models, e.g. FLUX.1-dev)."""
        raise QcacheError(f"sampling.guidance_scale: {type(self).__name__} cannot carry an embedded guidance scale")

    def row_groups(self) -> RowGroups | None:
        """Which rows carry the same condition (``dedup.RowGroups``); None when every row is distinct."""
        return None


@dataclass
class ClassCondition(Condition):
    """Class labels (N,) int64; the null class of CFG is one more label."""

    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, idx: torch.Tensor) -> ClassCondition:
        return ClassCondition(self.labels[idx])

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> ClassCondition:
        return ClassCondition(self.labels.to(device))

    def cat(self, other: Condition) -> ClassCondition:
        return ClassCondition(torch.cat([self.labels, other.labels]))

    def row_groups(self) -> RowGroups | None:
        return RowGroups.from_keys(self.labels)


def _cat_opt(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else torch.cat([a, b])


@dataclass
class TextCondition(Condition):
    """Text-encoder output: ``embeds`` (N, L, D), ``mask`` (N, L) with 1 = keep (or None), ``pooled`` (N, P) or None;
    ``guidance`` (N,) float32: the embedded guidance scale of guidance-distilled models (None otherwise)."""

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.embeds)

    def select(self, idx: torch.Tensor) -> TextCondition:
        return TextCondition(self.embeds[idx], None if self.mask is None else self.mask[idx],
                             None if self.pooled is None else self.pooled[idx],
                             None if self.guidance is None else self.guidance[idx])

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> TextCondition:
        # the guidance scale stays float32, as FluxPipeline makes it (the model casts it)
        return TextCondition(self.embeds.to(device, dtype), None if self.mask is None else self.mask.to(device),
                             None if self.pooled is None else self.pooled.to(device, dtype),
                             None if self.guidance is None else self.guidance.to(device))

    def cat(self, other: Condition) -> TextCondition:
        return TextCondition(torch.cat([self.embeds, other.embeds]), _cat_opt(self.mask, other.mask),
                             _cat_opt(self.pooled, other.pooled), _cat_opt(self.guidance, other.guidance))

    def with_guidance(self, scale: float) -> TextCondition:
        g = torch.full((len(self),), float(scale), dtype=torch.float32, device=self.embeds.device)
        return TextCondition(self.embeds, self.mask, self.pooled, g)

    def row_groups(self) -> RowGroups | None:
        return equal_rows(self.embeds, self.mask, self.pooled, self.guidance)

    def expand(self, n: int) -> TextCondition:
        """One condition (a batch of 1) repeated n times."""
        return self.select(torch.zeros(n, dtype=torch.long))


class Conditioner:
    """Maps integer condition ids to conditions; ``column`` names the id column of calibration pools."""

    column: str = "class_label"

    @property
    def num_ids(self) -> int:
        raise NotImplementedError

    def default_ids(self, n: int) -> torch.Tensor:
        """Ids of n samples when the caller gives none: every id in turn, cycling."""
        return torch.arange(n) % self.num_ids

    def check_ids(self, ids: torch.Tensor, what: str = "labels") -> None:
        """One-line error for ids outside [0, num_ids)."""
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_ids):
            raise QcacheError(f"{what}: condition ids must be in [0, {self.num_ids - 1}], got "
                              f"{int(ids.min())}..{int(ids.max())}")

    def condition(self, ids: torch.Tensor) -> Condition:
        raise NotImplementedError

    def null(self, n: int) -> Condition:
        """The unconditional condition of classifier-free guidance, n times."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short hash of everything that determines the conditions (for resumable-stage keys)."""
        raise NotImplementedError


class ClassConditioner(Conditioner):
    """Class-conditional models: an id is the class label; ``classes`` (optional) is the cycle of default ids."""

    column = "class_label"

    def __init__(self, num_classes: int, null_class: int, classes: Sequence[int] = ()) -> None:
        self.num_classes = int(num_classes)
        self.null_class = int(null_class)
        self.classes = tuple(int(c) for c in classes)
        bad = [c for c in self.classes if not 0 <= c < self.num_classes]
        if bad:
            raise QcacheError(f"condition.classes: class ids must be in [0, {self.num_classes - 1}] for this model, "
                              f"got {bad[0]}")

    @property
    def num_ids(self) -> int:
        return self.num_classes

    def default_ids(self, n: int) -> torch.Tensor:
        if not self.classes:
            return torch.arange(n) % self.num_classes
        return torch.tensor(self.classes, dtype=torch.long)[torch.arange(n) % len(self.classes)]

    def condition(self, ids: torch.Tensor) -> ClassCondition:
        return ClassCondition(ids.long())

    def null(self, n: int) -> ClassCondition:
        return ClassCondition(torch.full((n,), self.null_class, dtype=torch.long))

    def fingerprint(self) -> str:
        return f"classes:{self.num_classes}:{self.null_class}:{','.join(map(str, self.classes))}"


Encoder = Callable[[list[str]], TextCondition]


class PromptConditioner(Conditioner):
    """Text-conditional models: an id indexes ``prompts``, whose embeddings are encoded once and kept.

    ``bank`` holds the conditions of every prompt (N rows), ``negative`` the negative prompt's (1 row) used as the
    null condition. ``encoder`` (optional) encodes new prompts, so ``with_prompts`` can build a conditioner for
    prompts given at generation time; without it only the stored prompts can be used.
    """

    column = "prompt_index"

    def __init__(self, prompts: Sequence[str], bank: TextCondition, negative: TextCondition,
                 negative_prompt: str = "", encoder: Encoder | None = None) -> None:
        if len(prompts) == 0:
            raise QcacheError("condition.prompts: the prompt list is empty")
        if len(bank) != len(prompts) or len(negative) != 1:
            raise QcacheError(f"condition.prompts: {len(prompts)} prompts but {len(bank)} embeddings and "
                              f"{len(negative)} negative embeddings (expected {len(prompts)} and 1)")
        self.prompts = list(prompts)
        self.bank = bank
        self.negative = negative
        self.negative_prompt = negative_prompt
        self.encoder = encoder

    @classmethod
    def encode(cls, prompts: Sequence[str], encoder: Encoder, negative_prompt: str = "",
               batch_size: int = 16) -> PromptConditioner:
        """Encode ``prompts`` (in batches) and the negative prompt with ``encoder``."""
        parts = [encoder(list(prompts[i:i + batch_size])) for i in range(0, len(prompts), batch_size)]
        bank = parts[0]
        for p in parts[1:]:
            bank = bank.cat(p)
        return cls(prompts, bank, encoder([negative_prompt]), negative_prompt, encoder)

    def with_prompts(self, prompts: Sequence[str]) -> PromptConditioner:
        """A conditioner over other prompts (ids 0..len-1), encoded with the same encoder and negative prompt."""
        if list(prompts) == self.prompts:
            return self
        if self.encoder is None:
            raise QcacheError("prompts: this model has no text encoder loaded; only its stored prompts can be used")
        return PromptConditioner.encode(prompts, self.encoder, self.negative_prompt)

    @property
    def num_ids(self) -> int:
        return len(self.prompts)

    def condition(self, ids: torch.Tensor) -> TextCondition:
        return self.bank.select(ids.long().cpu())

    def null(self, n: int) -> TextCondition:
        return self.negative.expand(n)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in [*self.prompts, "\x00", self.negative_prompt]:
            h.update(p.encode() + b"\x00")
        return "prompts:" + h.hexdigest()[:16]
