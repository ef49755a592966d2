"""The cache as hooks: one diffusers ``ModelHook`` per cacheable module, one on the transformer, one sampler hook.

``attach_cache`` registers a ``_ModuleCacheHook`` (a ``new_forward``) on every cacheable module by name and a
``_StepHook`` on the transformer that advances the step counter. The module hooks hold no reference to anything
inside the modules (the Linear layers a quantizer replaces), only to the modules' own forward, so the cache works
whether it is attached before or after quantization. ``FeatureCache`` is also a ``SamplerHook``: it resets all state
when a generation starts and tells the other hooks whether the step just run was a full step
(``state.extras["full_step"]``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..errors import QcacheError
from ..families.base import DEFAULT_IO
from ..recipe import CacheConfig
from ..sampling import SamplerHook, StepState
from .accounting import CacheStats
from .adapters import ModuleIO, cache_layout
from .fast_path import HOOK_NAME as FAST_HOOK_NAME
from .fast_path import Workspace, attach_fast_paths
from .forecast import Forecaster, RelationalEstimator, sample_dist, sample_norm
from .policies import AllSteps, FixedSchedule, RelationalSchedule, StepPolicy

HOOK_NAME = "qcache_feature_cache"
STEP_HOOK_NAME = "qcache_feature_cache_step"
STORE_DTYPES = {"model": None, "float32": torch.float32, "bfloat16": torch.bfloat16}  # None: as the model computes


class _ModuleState:
    """What one cacheable module remembers: nothing (none), its last output (fora), differences, or RFE state."""

    def __init__(self, mode: str, order: int, expansion: str, store_dtype: torch.dtype, fused: bool = False) -> None:
        self.mode = mode
        self.forecaster = Forecaster(order if mode in ("taylor", "rfe") else 0, expansion, store_dtype, fused)
        self.rfe = RelationalEstimator(self.forecaster) if mode == "rfe" else None

    def reset(self) -> None:
        (self.rfe or self.forecaster).reset()

    def observe(self, step: int, inp: torch.Tensor, out: torch.Tensor) -> None:
        if self.rfe is not None:
            self.rfe.update(step, inp, out)
        elif self.mode != "none":
            self.forecaster.update(step, out)

    def forecast(self, step: int, inp: torch.Tensor | None, out: torch.Tensor | None = None,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The module's output at cached ``step``; ``out`` / ``scratch``: buffers to write into (see forecast.py)."""
        self.check_ready()
        if self.rfe is not None:
            return self.rfe.predict(step, inp, out=out, scratch=scratch)
        return self.forecaster.predict(step, out=out)

    def check_ready(self) -> None:
        """A forecast needs one full step first."""
        if self.forecaster.value is None:
            raise QcacheError("cache: a cached step came before any full step (warm-up must be >= 1)")

    def nbytes(self) -> int:
        return (self.rfe or self.forecaster).nbytes()


class _ModuleCacheHook(ModelHook):
    """Runs the module on full steps (and records it), returns the forecast on the others."""

    _is_stateful = True

    def __init__(self, cache: "FeatureCache", name: str, state: _ModuleState, watched: bool, io: ModuleIO) -> None:
        super().__init__()
        self.cache = cache
        self.name = name
        self.state = state
        self.watched = watched
        self.io = io  # how the module's call maps to the one input / output tensor the cache works on

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        cache, io = self.cache, self.io
        inp = io.input(args, kwargs)
        if self.watched:
            cache._decide(inp)
        if cache.full:
            out = self.fn_ref.original_forward(*args, **kwargs)
            self.state.observe(cache.step, inp, io.pack(out))
            return out
        pred = self.state.forecast(cache.step, inp)
        pred = pred.to(inp.dtype)  # forecasts are computed in float32: a bf16/fp16 model gets its own dtype back
        if cache.errors is not None:  # diagnostics: compute the real output too and keep the forecast error
            cache._record_error(self.name, pred, io.pack(self.fn_ref.original_forward(*args, **kwargs)))
        return io.unpack(pred, args, kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.reset()
        return module


class _StepHook(ModelHook):
    """On the transformer: every model call is one denoising step."""

    def __init__(self, cache: "FeatureCache") -> None:
        super().__init__()
        self.cache = cache

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        self.cache._begin_step(args[0] if args else kwargs["hidden_states"])
        return args, kwargs


def _module_mode(policy: str, rfe: bool) -> str:
    return {"none": "none", "fora": "reuse", "taylorseer": "taylor"}.get(policy, "rfe" if rfe else "taylor")


class FeatureCache(SamplerHook):
    """A feature cache attached to one transformer; append it to ``sampler.hooks``. ``remove()`` detaches it.

    ``full`` says whether the current step is a full step; ``stats`` accounts NFC and memory per generation.
    """

    def __init__(self, transformer: torch.nn.Module, cfg: CacheConfig, policy: StepPolicy,
                 module_mode: str) -> None:
        self.transformer = transformer
        self.cfg = cfg
        self.policy = policy
        self.module_mode = module_mode
        self.layout = cache_layout(transformer)
        self.stats = CacheStats()
        # diagnostics, off by default: {module name: {step: mean relative L2 error of the forecast}}
        self.errors: dict[str, dict[int, float]] | None = None
        self.step = -1
        self.full = True
        self._decided = False
        self._step_hint: int | None = None
        self._num_steps: int | None = None
        self._batch: int | None = None
        store = STORE_DTYPES[cfg.store_dtype]
        modules = dict(transformer.named_modules())
        self._states: dict[str, _ModuleState] = {}
        self._registries: list[HookRegistry] = []
        for name in self.layout.names:
            st = _ModuleState(module_mode, cfg.order, cfg.expansion, store, fused=cfg.compile)
            reg = HookRegistry.check_if_exists_or_initialize(modules[name])
            reg.register_hook(_ModuleCacheHook(self, name, st, name == self.layout.watched, self.layout.io_of(name)),
                              HOOK_NAME)
            self._states[name] = st
            self._registries.append(reg)
        reg = HookRegistry.check_if_exists_or_initialize(transformer)
        reg.register_hook(_StepHook(self), STEP_HOOK_NAME)
        self._registries.append(reg)
        self.workspace = Workspace()  # buffers of the lean cached-step path (fast_path.py)
        default_io = all(self.layout.io_of(n) is DEFAULT_IO for n in self.layout.names)
        self._fast_blocks = (attach_fast_paths(self, transformer, self.layout.names, self.layout.watched, self._states)
                             if cfg.fast_path and default_io and module_mode != "none" else [])
        self.attached = True

    # ---- state ---------------------------------------------------------------------------------------------
    def reset_state(self, num_steps: int | None = None, images: int | None = None) -> None:
        """Forget every stored tensor and start a new generation (called by ``on_start``)."""
        for st in self._states.values():
            st.reset()
        if self.errors is not None:
            self.errors = {}
        self.policy.reset(num_steps)
        self.step, self.full, self._decided, self._step_hint = -1, True, False, None
        self._num_steps, self._batch = num_steps, None
        self.stats.start_generation(images)

    def _begin_step(self, hidden_states: torch.Tensor) -> None:
        if self._batch is not None and hidden_states.shape[0] != self._batch:  # a new batch without on_start
            self.reset_state(self._num_steps)
        if self.stats.current is None:
            self.stats.start_generation(None)
        self._batch = hidden_states.shape[0]
        self.step = self.step + 1 if self._step_hint is None else self._step_hint
        self._step_hint = None
        self._decided = False
        if not self.policy.needs_input:
            self._set_full(self.policy.decide(self.step, None))

    def _decide(self, watched: torch.Tensor) -> None:
        if self.policy.needs_input and not self._decided:
            self._set_full(self.policy.decide(self.step, watched))

    def _set_full(self, full: bool) -> None:
        self.full, self._decided = full, True
        self.stats.record_step(self.step, full)

    def record_errors(self, on: bool = True) -> None:
        """Diagnostics: also run the modules on cached steps and keep each forecast's relative L2 error per step
        (of the current generation) in ``errors``. Costs a full computation on every step."""
        self.errors = {} if on else None

    def _record_error(self, name: str, pred: torch.Tensor, true: torch.Tensor) -> None:
        err = sample_dist(pred, true) / sample_norm(true).clamp_min(1e-12)
        self.errors.setdefault(name, {})[self.step] = float(err.mean())

    def memory_bytes(self) -> int:
        """Bytes of every tensor the cache holds right now (all modules plus the scheduler's input forecast)."""
        return sum(st.nbytes() for st in self._states.values()) + self.policy.nbytes()

    # ---- sampler hook points -------------------------------------------------------------------------------
    def on_start(self, state: StepState) -> None:
        self.reset_state(state.num_steps, int(state.latents.shape[0]))

    def before_model(self, state: StepState) -> None:
        self._step_hint = state.index

    def after_model(self, state: StepState) -> None:
        state.extras["full_step"] = bool(self.full)
        if self.full:
            self.stats.record_memory(self.memory_bytes())

    def on_end(self, state: StepState) -> None:
        self.stats.record_memory(self.memory_bytes())
        self.stats.end_generation()

    # ---- detaching ------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach every hook and drop the stored tensors; the modules' original forwards are restored."""
        if not self.attached:
            return
        modules = dict(self.transformer.named_modules())
        for name in self.layout.names:
            _remove_hook(modules[name], HOOK_NAME)
        for block in self._fast_blocks:
            _remove_hook(block, FAST_HOOK_NAME)
        _remove_hook(self.transformer, STEP_HOOK_NAME)
        for st in self._states.values():
            st.reset()
        self.policy.reset(None)
        self.workspace.clear()
        self.attached = False


def _remove_hook(module: torch.nn.Module, name: str) -> None:
    reg = getattr(module, "_diffusers_hook", None)
    if reg is None:
        return
    reg.remove_hook(name, recurse=False)
    if not reg.hooks:  # leave the module exactly as it was: no registry, forward from the class again
        del module._diffusers_hook
        fwd = module.__dict__.get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) is type(module).forward:
            del module.__dict__["forward"]


def make_policy(cfg: CacheConfig, tau: float | None = None, full_steps: list[int] | None = None) -> StepPolicy:
    """The step policy a cache config asks for; ``full_steps`` (a static schedule) overrides it."""
    if full_steps is not None:
        return FixedSchedule(full_steps=full_steps)
    if cfg.policy == "none":
        return AllSteps()
    if cfg.policy == "rfc" and cfg.rcs:
        tau = cfg.tau if tau is None else tau
        if tau is None:
            raise QcacheError("cache.tau: rcs needs tau; tune it to cache.target_nfc first (qcache.cache.tune_tau)")
        return RelationalSchedule(tau, cfg.warmup, cfg.order, cfg.expansion, STORE_DTYPES[cfg.store_dtype])
    return FixedSchedule(warmup=cfg.warmup, interval=cfg.interval, nfc=cfg.target_nfc)


def attach_cache(transformer: torch.nn.Module, cfg: CacheConfig, tau: float | None = None,
                 full_steps: list[int] | None = None) -> FeatureCache:
    """Attach a feature cache to ``transformer`` as ``cfg`` says; append the result to ``sampler.hooks``.

    ``tau`` overrides ``cfg.tau`` (RCS); ``full_steps`` replays a fixed list of full steps (a static schedule)
    with the forecast of ``cfg.policy``. Attaching twice to one transformer is an error.
    """
    reg = getattr(transformer, "_diffusers_hook", None)
    if reg is not None and reg.get_hook(STEP_HOOK_NAME) is not None:
        raise QcacheError("cache: a feature cache is already attached to this transformer; remove() it first")
    return FeatureCache(transformer, cfg, make_policy(cfg, tau, full_steps), _module_mode(cfg.policy, cfg.rfe))
