"""Time-grouped activation scales (TQ-DiT arXiv 2502.04056 / PTQ4DiT arXiv 2405.16005 style): ``quant.time_groups``.

Activation ranges of a diffusion transformer drift with the timestep, so one static scale per layer is a compromise
over the whole trajectory. With K groups the calibration rows are split by timestep into K groups of (nearly) equal
numbers of distinct timesteps, highest noise first; every activation-quantized module gets one input (and output)
scale per group, observed on that group's rows only. At run time a forward pre-hook on the transformer reads the
``timestep`` argument of each call, picks its group by the stored edges (in the units the model receives: FLUX gets
t / 1000) and copies that group's scales into the modules' ``input_scale`` / ``output_scale``; a forward hook puts
the ungrouped scales (observed on all rows, as with K = 1) back, so a saved model never holds a group's scale.
Because the switch lives on the model, every caller gets it: qcache's sampler, the cache, a diffusers pipeline.

The per-group scales are buffers of the quantized modules (``qcache_group_input_scale`` / ``_output_scale``, shape
(K,)), saved in ``model.safetensors`` beside quanto's tensors (``group_state``); the edges are in ``quant_map.json``
(``time_groups``). A batch is assumed to share one timestep (as the samplers give it); its first element decides
the group.
"""

from __future__ import annotations

import torch

from ..errors import QcacheError

IN_BUF, OUT_BUF = "qcache_group_input_scale", "qcache_group_output_scale"


def group_rows(timesteps: list[float], k: int) -> list[list[int]]:
    """Row indices of each of ``k`` groups: distinct timesteps sorted high to low, cut into k nearly equal runs."""
    distinct = sorted(set(timesteps), reverse=True)
    if len(distinct) < k:
        raise QcacheError(f"quant.time_groups: {k} groups need at least {k} distinct timesteps in the calibration "
                          f"set, got {len(distinct)}")
    group_of = {t: g for g in range(k) for t in distinct[g * len(distinct) // k:(g + 1) * len(distinct) // k]}
    return [[i for i, t in enumerate(timesteps) if group_of[t] == g] for g in range(k)]


def edges_between(received: list[tuple[float, float]]) -> list[float]:
    """Edges between consecutive groups from the (min, max) timestep each group's calls received: midpoints."""
    return [(received[g][0] + received[g + 1][1]) / 2 for g in range(len(received) - 1)]


def group_of(t: float, edges: list[float]) -> int:
    """The group of timestep ``t``: groups run from high to low timesteps, ``edges`` descending."""
    return sum(t < e for e in edges)


def _timestep_value(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        return None
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


class TimeGroupSwitch:
    """Forward pre/post hooks on the transformer that swap in the active group's activation scales."""

    def __init__(self, model: torch.nn.Module, names: list[str], edges: list[float]) -> None:
        self.edges = list(edges)
        self.modules = [model.get_submodule(n) for n in names]
        # the ungrouped scales, put back after every call (and before the next one, should a call have failed)
        self.default = [(m.input_scale.clone(), m.output_scale.clone()) for m in self.modules]
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after)]

    def _before(self, model, args, kwargs) -> None:
        t = _timestep_value(args, kwargs)
        if t is None:
            return self._after(model, args, None)
        g = group_of(t, self.edges)
        for m in self.modules:
            m.input_scale.copy_(getattr(m, IN_BUF)[g])
            m.output_scale.copy_(getattr(m, OUT_BUF)[g])

    def _after(self, model, args, out) -> None:
        for m, (i, o) in zip(self.modules, self.default):
            m.input_scale.copy_(i)
            m.output_scale.copy_(o)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def group_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The per-group scale buffers by state-dict key (quanto's modules leave extra buffers out of ``state_dict``)."""
    out = {}
    for name, m in model.named_modules():
        for buf in (IN_BUF, OUT_BUF):
            if buf in m._buffers:
                out[f"{name}.{buf}"] = m._buffers[buf].detach().cpu().contiguous()
    return out


def register_group_buffers(model: torch.nn.Module, names: list[str], k: int) -> None:
    """Empty (K,) scale buffers on each named module, shaped like the saved ones (before loading a state dict)."""
    for n in names:
        m = model.get_submodule(n)
        for buf, ref in ((IN_BUF, m.input_scale), (OUT_BUF, m.output_scale)):
            m.register_buffer(buf, torch.empty(k, dtype=ref.dtype, device=ref.device))


def attach(model: torch.nn.Module, names: list[str], edges: list[float]) -> TimeGroupSwitch:
    """Install the switch on ``model`` (replacing an earlier one); kept as ``model.qcache_time_groups``."""
    old = getattr(model, "qcache_time_groups", None)
    if old is not None:
        old.remove()
    switch = TimeGroupSwitch(model, names, edges)
    model.qcache_time_groups = switch
    return switch


def check_map(spec: object, k_modules: list[str], bad) -> None:
    """Validate ``quant_map.json``'s ``time_groups``: {"groups": K >= 2, "edges": K-1 descending numbers}."""
    if not isinstance(spec, dict) or not isinstance(spec.get("groups"), int) or isinstance(spec.get("groups"), bool) \
            or spec["groups"] < 2:
        raise bad("time_groups", "must be an object with an integer groups >= 2", spec)
    edges = spec.get("edges")
    if (not isinstance(edges, list) or len(edges) != spec["groups"] - 1
            or not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in edges)
            or any(a < b for a, b in zip(edges, edges[1:]))):
        raise bad("time_groups.edges", f"must be {spec['groups'] - 1} numbers, descending", edges)
    if not k_modules:
        raise bad("time_groups", "needs activation-quantized modules", spec)
