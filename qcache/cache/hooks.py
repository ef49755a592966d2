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
from ..hook_registry import remove_hook as _remove_hook
from ..recipe import CacheConfig
from ..sampling import SamplerHook, StepState
from .accounting import CacheStats
from .adapters import ModuleIO, cache_layout
from .fast_path import LeanPath, Workspace
from .forecast import ModuleState
from .formulas import sample_dist, sample_norm
from .schedule import AllSteps, FixedSchedule, RelationalSchedule, StepPolicy

HOOK_NAME = "qcache_feature_cache"
STEP_HOOK_NAME = "qcache_feature_cache_step"
STORE_DTYPES = {"model": None, "float32": torch.float32, "bfloat16": torch.bfloat16}  # None: as the model computes


class _ModuleCacheHook(ModelHook):
    """Runs the module on full steps (and records it), returns the forecast on the others."""

    _is_stateful = True

    def __init__(self, cache: FeatureCache, name: str, state: ModuleState, watched: bool, io: ModuleIO) -> None:
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
            cache.decide(inp)
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


def _prefix(inp: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``inp`` cut to ``like``'s tokens: where a block drops a stream (SD3's last block returns no text tokens), its
    output is a prefix of the input's tokens."""
    return inp if like.shape == inp.shape else inp[:, : like.shape[1]]


def _residual_step(hook: ModelHook, state: ModuleState, inp: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    """One step of a residual unit (a block, or a span ending at this block) whose input is ``inp``: full steps run
    the module and record its residual ``out - inp``; cached steps return ``inp`` + the forecast residual."""
    cache, io = hook.cache, hook.io
    if cache.full:
        out = hook.fn_ref.original_forward(*args, **kwargs)
        packed = io.pack(out)
        state.observe(cache.step, inp, packed - _prefix(inp, packed))
        return out
    state.check_ready()
    pred = state.cached_step(cache.step, _prefix(inp, state.forecaster.value), None, inp=inp)
    if cache.errors is not None:  # diagnostics: the real output too (a span's blocks ran for it), as cached
        cache._record_error(hook.name, pred, io.pack(hook.fn_ref.original_forward(*args, **kwargs)))
    return io.unpack(pred, args, kwargs)


class _BlockCacheHook(ModelHook):
    """``cache.granularity: block``: runs the block on full steps and records its residual (output - input, with
    the input as RFE's I); on cached steps returns input + forecast residual."""

    _is_stateful = True

    def __init__(self, cache: FeatureCache, name: str, state: ModuleState, watched: bool, io: ModuleIO) -> None:
        super().__init__()
        self.cache, self.name, self.state, self.watched, self.io = cache, name, state, watched, io

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        inp = self.io.input(args, kwargs)
        if self.watched:
            self.cache.decide(inp)
        return _residual_step(self, self.state, inp, args, kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.reset()
        return module


class _Span:
    """The shared state of a span's hooks: the unit's state and the span's input on the current step."""

    def __init__(self, state: ModuleState) -> None:
        self.state = state
        self.inp: torch.Tensor | None = None


class _SpanHook(ModelHook):
    """``cache.granularity: span``, on each block of the cached span: on full steps the blocks run and the last one
    records the span's residual (its output - the first block's input); on cached steps every block but the last
    passes its input through and the last returns input + forecast residual."""

    _is_stateful = True

    def __init__(self, cache: FeatureCache, name: str, span: _Span, first: bool, last: bool, io: ModuleIO) -> None:
        super().__init__()
        self.cache, self.name, self.span, self.first, self.last, self.io = cache, name, span, first, last, io

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        cache, io, span = self.cache, self.io, self.span
        if self.first:
            span.inp = io.input(args, kwargs)
            cache.decide(span.inp)  # RCS watches the fresh head's output: the span's input
        run = cache.full or cache.errors is not None
        if not self.last:
            return self.fn_ref.original_forward(*args, **kwargs) if run else io.unpack(io.input(args, kwargs), args,
                                                                                      kwargs)
        return _residual_step(self, span.state, span.inp, args, kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.span.state.reset()
        self.span.inp = None
        return module


def cached_blocks(layout, cfg: CacheConfig) -> list[str]:
    """The blocks whose residuals are cached: all (block), or those between the fresh head and tail (span)."""
    blocks = list(layout.blocks)
    if not blocks:
        raise QcacheError(f"cache.granularity: {cfg.granularity} needs the model family to list its transformer "
                          f"blocks (CacheLayout.blocks); this one lists none")
    if cfg.granularity == "block":
        return blocks
    head, tail = cfg.fresh_head, cfg.fresh_tail
    if head + tail >= len(blocks):
        raise QcacheError(f"cache.fresh_head: fresh_head + fresh_tail ({head} + {tail}) must leave at least one of "
                          f"the model's {len(blocks)} blocks to cache")
    return blocks[head: len(blocks) - tail]


class _StepHook(ModelHook):
    """On the transformer: every model call is one denoising step."""

    def __init__(self, cache: FeatureCache) -> None:
        super().__init__()
        self.cache = cache

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        self.cache._begin_step(args[0] if args else kwargs["hidden_states"])
        return args, kwargs


def _module_mode(policy: str, rfe: bool) -> str:
    return {"none": "none", "fora": "reuse", "taylorseer": "forecast"}.get(policy, "rfe" if rfe else "forecast")


class FeatureCache(SamplerHook):
    """A feature cache attached to one transformer, and a sampler hook of the samplers it was added to.

    Use it as a context manager (``with attach_cache(transformer, cfg, sampler=s) as cache:``): on exit it detaches
    from the modules and from every sampler it was added to (``add_to``); ``remove()`` does the same by hand.
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
        self.granularity = cfg.granularity
        self._states: dict[str, ModuleState] = {}
        self._hooked: list[str] = []  # the modules carrying a HOOK_NAME hook

        def state(name: str) -> ModuleState:
            self._states[name] = ModuleState(module_mode, cfg.order, cfg.expansion, store, fused=cfg.compile)
            return self._states[name]

        def hook(name: str, h: ModelHook) -> None:
            HookRegistry.check_if_exists_or_initialize(modules[name]).register_hook(h, HOOK_NAME)
            self._hooked.append(name)

        if cfg.granularity == "module":
            for name in self.layout.names:
                hook(name, _ModuleCacheHook(self, name, state(name), name == self.layout.watched,
                                            self.layout.io_of(name)))
        else:
            blocks = cached_blocks(self.layout, cfg)
            if cfg.granularity == "block":
                for i, name in enumerate(blocks):
                    hook(name, _BlockCacheHook(self, name, state(name), i == 0, self.layout.io_of(name)))
            else:  # span: one residual from the first cached block's input to the last one's output
                unit = f"span:{blocks[0]}..{blocks[-1]}"
                span = _Span(state(unit))
                for i, name in enumerate(blocks):
                    hook(name, _SpanHook(self, unit, span, i == 0, i == len(blocks) - 1, self.layout.io_of(name)))
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_StepHook(self), STEP_HOOK_NAME)
        default_io = all(self.layout.io_of(n) is DEFAULT_IO for n in self.layout.names)
        # the lean cached-step path (fast_path.py), owned by the cache; it sees it as a StepControl
        self.lean = (LeanPath(self, transformer, self._states, self.layout.watched)
                     if cfg.fast_path and default_io and module_mode != "none" and cfg.granularity == "module"
                     else None)
        self._samplers: list = []  # samplers whose hooks list holds this cache (add_to)
        self.attached = True

    # ---- lifecycle -----------------------------------------------------------------------------------------------
    def add_to(self, sampler) -> FeatureCache:
        """Append this cache to ``sampler.hooks`` (once); ``remove()`` takes it off again. Returns the cache."""
        if not any(h is self for h in sampler.hooks):
            sampler.hooks.append(self)
        if not any(x is sampler for x in self._samplers):
            self._samplers.append(sampler)
        return self

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- what the lean path reads (fast_path.StepControl) --------------------------------------------------------
    @property
    def decided(self) -> bool:
        """Whether the current step's full/cached decision is made."""
        return self._decided

    @property
    def compiled(self) -> bool:
        return self.cfg.compile

    @property
    def recording(self) -> bool:
        """Whether forecast errors are being recorded (``record_errors``)."""
        return self.errors is not None

    @property
    def workspace(self) -> Workspace:
        """The lean path's buffers (empty without one)."""
        return self.lean.workspace if self.lean is not None else Workspace()

    @property
    def fast_blocks(self) -> list[torch.nn.Module]:
        """The blocks whose cached steps run the lean path."""
        return self.lean.blocks if self.lean is not None else []

    _fast_blocks = fast_blocks  # older name

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

    def decide(self, watched: torch.Tensor) -> None:
        """Decide on the watched module's input whether this step is full (once per step; RCS)."""
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
        """Detach every hook and drop the stored tensors; the modules' original forwards are restored and the cache
        leaves the hooks of every sampler it was added to. Removing twice does nothing."""
        for sampler in self._samplers:
            sampler.hooks[:] = [h for h in sampler.hooks if h is not self]
        self._samplers = []
        if not self.attached:
            return
        modules = dict(self.transformer.named_modules())
        for name in self._hooked:
            _remove_hook(modules[name], HOOK_NAME)
        if self.lean is not None:
            self.lean.remove(_remove_hook)
        _remove_hook(self.transformer, STEP_HOOK_NAME)
        for st in self._states.values():
            st.reset()
        self.policy.reset(None)
        self.attached = False


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
                 full_steps: list[int] | None = None, sampler=None) -> FeatureCache:
    """Attach a feature cache to ``transformer`` as ``cfg`` says.

    ``tau`` overrides ``cfg.tau`` (RCS); ``full_steps`` replays a fixed list of full steps (a static schedule)
    with the forecast of ``cfg.policy``. ``sampler``: also add the cache to ``sampler.hooks`` (``add_to``); else
    append it yourself. The result is a context manager that detaches everything on exit::

        with attach_cache(transformer, cfg, sampler=s) as cache:
            s.sample(n)

    Attaching twice to one transformer is an error.
    """
    reg = getattr(transformer, "_diffusers_hook", None)
    if reg is not None and reg.get_hook(STEP_HOOK_NAME) is not None:
        raise QcacheError("cache: a feature cache is already attached to this transformer; remove() it first")
    cache = FeatureCache(transformer, cfg, make_policy(cfg, tau, full_steps), _module_mode(cfg.policy, cfg.rfe))
    return cache.add_to(sampler) if sampler is not None else cache
