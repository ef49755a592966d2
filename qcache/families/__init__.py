"""Model families: per-architecture adapters for the sampler, the cache, the quantizer and VAE decoding.

``family_for(transformer)`` picks the adapter (DiT, PixArt-α/Σ, SD3, FLUX.1) from the transformer's diffusers class;
conditions and conditioners (class labels or prompt embeddings, and the null condition of CFG) are in
``conditions``; ``parts`` bundles a model's conditioner and VAE decoder. See docs/families.md.
"""

from .base import CacheLayout, ModelFamily, ModuleIO, QuantPatterns
from .conditions import ClassCondition, ClassConditioner, Condition, Conditioner, PromptConditioner, TextCondition
from .registry import FAMILIES, family_by_name, family_for, family_for_class, supported_classes

__all__ = [
    "FAMILIES", "CacheLayout", "ClassCondition", "ClassConditioner", "Condition", "Conditioner", "ModelFamily",
    "ModuleIO", "PromptConditioner", "QuantPatterns", "TextCondition", "family_by_name", "family_for",
    "family_for_class", "supported_classes",
]
