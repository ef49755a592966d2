"""Model loading: ``model.source`` (builtin:NAME, a local diffusers directory, or a hub id) to a ready transformer,
and the parts around it (conditioner, VAE decoder)."""

from .loading import LoadedModel, build_parts, load_model, load_parts, resolve_device, resolve_location

__all__ = ["LoadedModel", "build_parts", "load_model", "load_parts", "resolve_device", "resolve_location"]
