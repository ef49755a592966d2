"""A compressed model as a working diffusers pipeline (``DiTPipeline``, ``PixArtAlphaPipeline``, ...).

``to_pipeline(model)`` loads the base model's pipeline class from its source *around* the quantized transformer
(VAE, text encoders, tokenizers come from the source; the transformer is the compressed one), attaches the feature
cache to the transformer, and replaces the pipeline's scheduler by ``CompressedScheduler``: the recipe's scheduler,
which starts a new cache generation at every ``set_timesteps`` (so every pipeline call starts with an empty cache
and replays the schedule from step 0) and applies the variance-compensation factors after every ``step``. The
pipeline is then called as usual, with the number of steps the model was compressed for.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import QcacheError
from .vc import compensate


class CompressedScheduler:
    """A diffusers scheduler wrapped for a compressed model: cache reset at ``set_timesteps``, VC after ``step``.

    Everything else (``timesteps``, ``config``, ``scale_model_input``, ``init_noise_sigma``, ...) is the wrapped
    scheduler's.
    """

    def __init__(self, scheduler: Any, steps: int, cache=None, vc_factors: torch.Tensor | None = None) -> None:
        self.__dict__.update(_inner=scheduler, _steps=steps, _cache=cache, _factors=vc_factors, _index=0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_inner"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    @property
    def step_count(self) -> int:
        """Scheduler steps taken since the last ``set_timesteps``."""
        return self._index

    def set_timesteps(self, num_inference_steps: int | None = None, *args: Any, sigmas: Any = None,
                      **kwargs: Any) -> Any:
        # ``sigmas`` is named so that pipelines passing their own (FluxPipeline) see that it is accepted
        n = len(sigmas) if num_inference_steps is None and sigmas is not None else num_inference_steps
        if n is not None and n != self._steps:
            raise QcacheError(f"num_inference_steps: the compressed model's cache schedule and VC factors are for "
                              f"{self._steps} steps, got {n}")
        if sigmas is not None:
            kwargs["sigmas"] = sigmas
        out = self._inner.set_timesteps(num_inference_steps, *args, **kwargs)
        self.__dict__["_index"] = 0
        if self._cache is not None:
            self._cache.reset_state(self._steps)  # a new generation: empty cache, schedule from step 0
        return out

    def step(self, *args: Any, **kwargs: Any) -> Any:
        out = self._inner.step(*args, **kwargs)
        i = self._index
        self.__dict__["_index"] = i + 1
        if self._factors is None:
            return out
        if i >= len(self._factors):
            raise QcacheError(f"num_inference_steps: VC factors cover {len(self._factors)} steps, step {i} was asked")
        if isinstance(out, tuple):
            return (_compensate(out[0], self._factors[i]), *out[1:])
        out.prev_sample = _compensate(out.prev_sample, self._factors[i])
        return out


def _compensate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """VC on the pipeline's latents: (B, C, H, W), or FLUX's packed (B, tokens, 4C) 2x2 patches, whose channel c is
    packed columns 4c..4c+3 (the per-channel spatial mean covers every token and the four patch positions)."""
    if x.dim() != 3:
        return compensate(x, k)
    b, n, c4 = x.shape
    grid = x.view(b, n, c4 // 4, 4).permute(0, 2, 1, 3)  # (B, C, tokens, 4): a spatial layout of each channel
    return compensate(grid, k).permute(0, 2, 1, 3).reshape(b, n, c4)


def to_pipeline(model, mode: str = "static", vc: bool = True, **from_pretrained: Any):
    """The diffusers pipeline of ``model``'s base source with the compressed transformer, cache and VC active.

    ``mode``: ``static`` replays the saved full-step schedule, ``live`` runs RCS with the tuned tau. The cache
    stays attached to the transformer until ``pipe.qcache_cache.remove()``. Extra keyword arguments go to the
    pipeline's ``from_pretrained`` (e.g. ``local_files_only=True``).
    """
    import diffusers

    from .models.loading import resolve_location
    from .sampling import make_scheduler

    family = model.parts.family
    location = resolve_location(model.source)
    cls_name = model.info.get("manifest", {}).get("pipeline_class") or family.pipeline_class
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise QcacheError(f"pipeline: unknown diffusers pipeline class {cls_name!r}")
    if model.parts.vae is None:
        raise QcacheError(f"pipeline: {model.source} has no VAE; {cls_name} decodes through one (use generate())")
    dtype = next(model.transformer.parameters()).dtype
    try:
        pipe = cls.from_pretrained(location, transformer=model.transformer, torch_dtype=dtype, **from_pretrained)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QcacheError(f"pipeline: cannot load {cls_name} from {model.source}: {first}") from None
    cache = model.attach_cache(mode)  # static / live: qcache.cache.attach_schedule
    scheduler = make_scheduler(model.sampling.scheduler, model.scheduler_config)
    pipe.scheduler = CompressedScheduler(scheduler, model.sampling.steps, cache,
                                         model.vc_factors if vc else None)
    pipe.qcache_cache = cache
    return pipe.to(model.transformer.device)
