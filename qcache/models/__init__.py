"""Model loading: ``model.source`` (builtin:NAME, a local diffusers directory, or a hub id) to a ready transformer."""

from .loading import LoadedModel, load_model, resolve_device

__all__ = ["LoadedModel", "load_model", "resolve_device"]
