"""``quantize_transformer``: observe ranges on the full-precision model, swap in quanto modules, write scales, freeze.

Order matters and is fixed here: (1) round the tensors that stay unquantized to ``keep_dtype`` (so the checkpoint
can store them in 16 bits and reload bit-identically), (2) observe activation ranges over the whole calibration
set with our observers, (3) replace the planned Linear/Conv2d modules by quanto modules, (4) write
``input_scale``/``output_scale`` = range / 127 and make the output-quantization decision explicit, (5) freeze.
quanto's ``Calibration`` is never used (EMA with a fixed input momentum; streamline decisions are not saved).
"""

from __future__ import annotations

import torch
from optimum.quanto import freeze
from optimum.quanto.nn import quantize_module

from ..errors import QcacheError
from ..recipe import QuantConfig
from . import weight_clip
from .kernels import use_exact_cpu_int_mm
from .observers import observe_ranges
from .plan import plan_quantization, round_kept_tensors

QTYPES = {"int8": "qint8", "int4": "qint4", "none": None}
INT8_MAX = 127.0
MIN_RANGE = 1e-8  # a module whose input is all zeros still gets a usable scale
FORMAT = "qcache-quanto/1"


def run_calibration(model: torch.nn.Module, calib, guidance: bool | float = True, batch_size: int = 128,
                    conditioner: Conditioner | None = None) -> None:  # noqa: F821 - qcache.families
    """One forward pass of the model over every row of ``calib`` (columns x, timestep and the conditioner's id
    column: ``class_label`` for class models, ``prompt_index`` for text models).

    ``conditioner`` (default: the family's class conditioner) turns the ids back into the conditions the rows were
    sampled with. With ``guidance`` (True, or a guidance scale > 1) each row also runs with the null condition in
    the same batch, as the CFG sampler does; models that embed the guidance scale (FLUX.1-dev) get the scale
    (``guidance`` as a float) as an input instead.
    """
    from ..families.registry import family_for

    family = family_for(model)
    conditioner = conditioner if conditioner is not None else family.default_conditioner(model)
    param = next(model.parameters())
    col = conditioner.column
    if col not in calib.column_names:
        raise QcacheError(f"calibration: the calibration set has no {col!r} column (columns: {calib.column_names}); "
                          f"it was collected for another kind of model")
    ds = calib.with_format("torch", columns=["x", "timestep", col])
    with torch.no_grad():
        for start in range(0, len(ds), batch_size):
            rows = ds[start:start + batch_size]
            x, t = rows["x"].to(param.device, param.dtype), rows["timestep"].to(param.device)
            cond = conditioner.condition(rows[col])
            if family.embeds_guidance(model):
                if isinstance(guidance, bool):
                    raise QcacheError(f"sampling.guidance_scale: {type(model).__name__} embeds the guidance scale; "
                                      f"calibration needs its value")
                cond = cond.with_guidance(float(guidance))
            elif guidance is True or (not isinstance(guidance, bool) and guidance > 1.0):
                x, t = torch.cat([x, x]), torch.cat([t, t])
                cond = cond.cat(conditioner.null(len(rows[col])))
            family.forward(model, x, t, cond.to(param.device, param.dtype))


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_plan(model: torch.nn.Module, plan: dict[str, dict]) -> None:
    """Replace every planned module by its quanto counterpart (weights not frozen yet)."""
    for name, spec in plan.items():
        module = model.get_submodule(name)
        qmodule = quantize_module(module, weights=QTYPES[spec["weights"]], activations=QTYPES[spec["activations"]])
        if qmodule is None:
            raise QcacheError(f"quant: module {name!r} ({type(module).__name__}) has no quanto counterpart")
        qmodule.name = name
        _set_module(model, name, qmodule)


def set_output_quantization(model: torch.nn.Module, decisions: dict[str, bool]) -> None:
    """Make each module's output quantization what ``decisions`` says (quanto turns it on for every A8 module)."""
    for name, keep in decisions.items():
        m = model.get_submodule(name)
        if not keep:
            m.disable_output_quantization()


def quantize_transformer(transformer: torch.nn.Module, cfg: QuantConfig, calib=None, *, guidance: bool | float = True,
                         batch_size: int = 128, conditioner=None) -> torch.nn.Module:
    """Quantize ``transformer`` in place per ``cfg``; activation ranges come from all rows of ``calib``.

    ``calib`` is a ``datasets.Dataset`` with columns x, timestep and the condition ids (see ``calibration``); it
    is needed only when some module quantizes activations; ``conditioner`` maps the ids to conditions (default:
    the family's class conditioner). Call it on a model without an active feature cache. Returns the
    same module, frozen, with ``transformer.qcache_quant`` describing what was done (used by ``save_quantized``).
    With ``cfg.backend == "torchao"`` the speed backend runs instead (dynamic activations: ``calib`` is not used).
    """
    if cfg.backend == "torchao":
        from .torchao_backend import quantize_torchao

        return quantize_torchao(transformer, cfg)
    plan = plan_quantization(transformer, cfg)
    act_names = [n for n, s in plan.items() if s["activations"] != "none"]
    if act_names and (calib is None or len(calib) == 0):
        raise QcacheError(f"quant.preset: {cfg.preset} quantizes activations and needs a non-empty calibration set")
    transformer.eval().requires_grad_(False)
    round_kept_tensors(transformer, plan, cfg.keep_dtype)
    ranges = {}
    if act_names:
        ranges = observe_ranges(transformer, act_names, lambda: run_calibration(transformer, calib, guidance,
                                                                                batch_size, conditioner),
                                cfg.observer, cfg.percentile)
    groups = _time_group_ranges(transformer, cfg, calib, act_names, guidance, batch_size, conditioner)
    grams = _weight_clip_grams(transformer, cfg, plan, calib, guidance, batch_size, conditioner)
    apply_plan(transformer, plan)
    clip = None if grams is None else weight_clip.install(transformer, grams)
    use_exact_cpu_int_mm(transformer)
    decisions = {}
    for name in act_names:
        m = transformer.get_submodule(name)
        dtype, device = m.input_scale.dtype, m.input_scale.device
        m.input_scale = _scale(ranges[name]["input"], dtype, device)
        m.output_scale = _scale(ranges[name]["output"], dtype, device)
        decisions[name] = bool(cfg.quantize_outputs)
    if groups is not None:
        from .time_groups import IN_BUF, OUT_BUF, attach

        for name in act_names:
            m = transformer.get_submodule(name)
            for buf, key, ref in ((IN_BUF, "input", m.input_scale), (OUT_BUF, "output", m.output_scale)):
                m.register_buffer(buf, torch.stack([_scale(r[name][key], ref.dtype, ref.device)
                                                    for r in groups["ranges"]]))
    set_output_quantization(transformer, decisions)
    freeze(transformer)  # the weights are quantized here (with the clip-search optimizer where installed)
    transformer.requires_grad_(False)
    modules = {n: {**s, "quantize_output": decisions.get(n, False)} for n, s in plan.items()}
    transformer.qcache_quant = {
        "format": FORMAT,
        "preset": cfg.preset,
        "observer": cfg.observer,
        "percentile": cfg.percentile if cfg.observer == "percentile" else None,
        "keep_dtype": cfg.keep_dtype,
        "calibration_rows": 0 if calib is None else len(calib),
        "modules": modules,
        "ranges": ranges,
    }
    if clip is not None:  # absent without the search: the quant map stays as it was
        transformer.qcache_quant["weight_clip"] = weight_clip.summary(clip)
        for n in clip:  # the optimizer (and its Gram matrix) is not needed once the weights are frozen
            transformer.get_submodule(n).optimizer = None
    if groups is not None:  # absent with one group: the quant map stays as it was
        transformer.qcache_quant["time_groups"] = {"groups": cfg.time_groups, "edges": groups["edges"]}
        transformer.qcache_quant["group_ranges"] = groups["ranges"]
        attach(transformer, act_names, groups["edges"])
    return transformer


def _weight_clip_grams(transformer: torch.nn.Module, cfg: QuantConfig, plan: dict, calib, guidance,
                       batch_size: int, conditioner) -> dict[str, torch.Tensor] | None:
    """With ``cfg.weight_clip == "search"``: the input Gram matrices of the int4 Linear layers over the calibration
    set (``qcache.quant.weight_clip``); None otherwise."""
    if cfg.weight_clip != "search":
        return None
    targets = weight_clip.clip_targets(transformer, plan)
    if not targets:
        raise QcacheError(f"quant.weight_clip: search applies to int4 Linear weights; preset {cfg.preset} (with its "
                          f"overrides) has none")
    if calib is None or len(calib) == 0:
        raise QcacheError("quant.weight_clip: search needs a non-empty calibration set")
    return weight_clip.collect_grams(targets, lambda: run_calibration(transformer, calib, guidance, batch_size,
                                                                      conditioner))


def _scale(r: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(max(r, MIN_RANGE) / INT8_MAX, dtype=dtype, device=device)


def _time_group_ranges(transformer: torch.nn.Module, cfg: QuantConfig, calib, act_names: list[str],
                       guidance, batch_size: int, conditioner) -> dict | None:
    """With ``cfg.time_groups`` > 1: each group's ranges (observed on its own rows) and the edges between groups in
    the timestep units the model receives (``qcache.quant.time_groups``); None with one group."""
    if cfg.time_groups <= 1:
        return None
    from .time_groups import edges_between, group_rows

    if not act_names:
        raise QcacheError(f"quant.time_groups: {cfg.time_groups} groups need activation-quantized modules; preset "
                          f"{cfg.preset} quantizes none")
    rows = group_rows([float(t) for t in calib["timestep"]], cfg.time_groups)
    received: list[list[float]] = []

    def record(model, args, kwargs) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        received[-1].extend(float(v) for v in torch.as_tensor(t).flatten())

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    ranges = []
    try:
        for idx in rows:
            sub = calib.select(idx)
            received.append([])
            ranges.append(observe_ranges(transformer, act_names, lambda sub=sub: run_calibration(
                transformer, sub, guidance, batch_size, conditioner), cfg.observer, cfg.percentile))
    finally:
        handle.remove()
    return {"ranges": ranges, "edges": edges_between([(min(r), max(r)) for r in received])}

