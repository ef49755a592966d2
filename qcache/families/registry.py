"""Which ``ModelFamily`` a transformer belongs to, by its diffusers class name (quantized models keep theirs)."""

from __future__ import annotations

import torch

from ..errors import QcacheError
from .base import ModelFamily
from .dit import DiTFamily
from .flux import FluxFamily
from .pixart import PixArtFamily
from .sd3 import SD3Family

FAMILIES: tuple[ModelFamily, ...] = (DiTFamily(), PixArtFamily(), SD3Family(), FluxFamily())
_BY_CLASS = {cls: f for f in FAMILIES for cls in f.transformer_classes}
_BY_NAME = {f.name: f for f in FAMILIES}


def supported_classes() -> tuple[str, ...]:
    return tuple(_BY_CLASS)


def family_for_class(class_name: str, what: str = "model.source") -> ModelFamily:
    """The family of a diffusers transformer class name; one-line error naming ``what`` when there is none."""
    fam = _BY_CLASS.get(class_name)
    if fam is None:
        raise QcacheError(f"{what}: model class {class_name!r} is not supported yet "
                          f"(supported: {', '.join(supported_classes())})")
    return fam


def family_for(transformer: torch.nn.Module) -> ModelFamily:
    """The family of a transformer instance."""
    return family_for_class(type(transformer).__name__, what="model")


def family_by_name(name: str) -> ModelFamily:
    fam = _BY_NAME.get(name)
    if fam is None:
        raise QcacheError(f"family: unknown model family {name!r} (known: {', '.join(_BY_NAME)})")
    return fam
