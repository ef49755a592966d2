"""Recipes: a YAML file validated into typed, frozen config dataclasses.

Every section is a dataclass; a field's range and choices live in its ``metadata`` and one generic validator
walks them, so a bad value is reported as ``key.path: problem, got value`` whatever the section. Sections that a
later stage of qcache will fill are rejected as "not supported yet" instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .cli import MAX_SEED, short, short_str
from .errors import QcacheError

INT_CEILING = 2**31 - 1  # integers without their own upper bound stay below this (counts, sizes)
MAX_YAML_NODES = 100_000  # a recipe whose aliases expand beyond this many values is refused (alias bombs)


class RecipeError(QcacheError):
    """A recipe that does not validate; the message starts with the key path at fault."""


def _f(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
       lt: float | None = None, doc: str = "") -> Any:
    """A dataclass field with a range check the validator enforces."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, doc=doc).items() if v not in (None, "")}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    """Which transformer to load, where to run it, and in what dtype."""

    source: str = "builtin:digits"  # builtin:NAME, a local diffusers directory, or a hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass(frozen=True)
class SamplingConfig:
    """The denoising loop: scheduler, number of steps, classifier-free guidance, seed, batch size."""

    scheduler: Literal["ddim", "ddpm", "dpmsolver++", "flow-euler"] = "ddim"  # flow-euler: flow-matching models
    steps: int = _f(50, ge=1, le=1000)
    guidance_scale: float = _f(1.5, ge=1.0, le=50.0)  # 1.0 disables CFG
    seed: int = _f(0, ge=0, le=MAX_SEED)
    batch_size: int = _f(500, ge=1)


@dataclass(frozen=True)
class ConditionConfig:
    """What the samples are conditioned on (docs/families.md).

    Class models: ``classes`` is the cycle of class ids used for calibration, tuning, VC and evaluation (empty:
    every class in turn). Text models: ``prompts`` is a ``datasets`` directory (``save_to_disk``) with a ``prompt``
    column, encoded once with the base model's own text encoders; ``negative_prompt`` (null: "") is the null
    condition of CFG; ``max_sequence_length`` the text encoder's token budget (null: the pipeline's default).
    """

    classes: list[int] = _f([])
    prompts: str | None = None
    negative_prompt: str | None = None  # null: the empty prompt
    max_sequence_length: int | None = _f(None, ge=1, le=4096)

    def validate(self, path: str) -> None:
        for i, c in enumerate(self.classes):
            if c < 0:
                raise RecipeError(f"{path}.classes[{i}]: must be >= 0, got {c}")
        if self.classes and self.prompts is not None:
            raise RecipeError(f"{path}.prompts: give classes (class models) or prompts (text models), not both")


@dataclass(frozen=True)
class EvalConfig:
    """How the evaluator measures: number of samples, latency repeats, FLOP counting."""

    n: int = _f(500, ge=2)  # FID needs two samples
    latency_repeats: int = _f(3, ge=1, le=100)
    latency_samples: int = _f(500, ge=1)  # images per timed sampling run
    # metrics (qcache/metrics_local.py, docs/scale.md); class_accuracy/fid_data: the digits judge, always measured.
    # fid/is need `inception`, clip_score `clip`, lpips `lpips`; lpips/psnr/ssim/fid_to_fp a paired reference set
    metrics: list[Literal["class_accuracy", "fid_data", "fid", "is", "clip_score", "lpips", "psnr", "ssim",
                          "fid_to_fp"]] = _f(["class_accuracy", "fid_data"])
    inception: str | None = None  # FID Inception-v3 weights (.pth, torch-fidelity's port of the TF graph)
    fid_reference: str | None = None  # FID reference: image folder, .npz of images (arr_0) or of mu/sigma
    clip: str | None = None  # local CLIP directory (transformers save_pretrained: model + processor)
    lpips: str | None = None  # torchvision alexnet/vgg16/squeezenet1_1 state_dict for LPIPS's backbone

    def validate(self, path: str) -> None:
        if "fid" in self.metrics and self.inception is not None and self.fid_reference is None:
            raise RecipeError(f"{path}.fid_reference: fid needs reference images or statistics, got none")


@dataclass(frozen=True)
class CacheConfig:
    """Feature caching (qcache.cache): which policy skips the cacheable modules on which steps, and how it forecasts.

    ``none`` computes every step; ``fora`` reuses the last output; ``taylorseer`` forecasts with finite differences
    of order ``order``; ``rfc`` adds relational feature estimation (``rfe``) and relational cache scheduling
    (``rcs``). Fixed schedules use ``interval`` (or ``target_nfc`` evenly spread full steps); RCS uses ``tau``, or
    tunes it on a calibration batch to ``target_nfc``. ``schedule`` replays a saved static schedule instead.
    """

    policy: Literal["none", "fora", "taylorseer", "rfc"] = "none"
    interval: int = _f(4, ge=1, le=1000)  # full step every `interval` steps (fixed schedules)
    order: int = _f(2, ge=0, le=4)  # forecast order m (taylorseer, rfc)
    warmup: int = _f(2, ge=1, le=1000)  # first steps always computed fully
    tau: float | None = _f(None, ge=0.0)  # RCS threshold (finite; 0: every step full); null: tuned to target_nfc
    target_nfc: int | None = _f(None, ge=1)  # full steps per generation to aim for
    rfe: bool = True  # rfc: relational feature estimation (magnitude from the module input)
    rcs: bool = True  # rfc: relational cache scheduling (full step when the input forecast error adds up)
    expansion: Literal["newton", "taylor"] = "newton"  # forecast form, see docs/cache.md
    # dtype of the stored differences; model: bfloat16 for a bf16 model, float32 for every other
    store_dtype: Literal["model", "float32", "bfloat16"] = "model"
    schedule: str | None = None  # path of a static schedule JSON to replay
    fast_path: bool = True  # cached steps of DiT/PixArt blocks skip the block's own forward (qcache/cache/fast_path.py)
    compile: bool = False  # lean path: fuse a cached step's arithmetic with torch.compile (qcache/cache/fused.py)
    tune_samples: int = _f(64, ge=1)  # calibration batch size for tuning tau
    tune_seed: int = _f(1, ge=0, le=MAX_SEED)  # its noise seed (keep it apart from the evaluation seed)
    # what one cached quantity is: each cacheable module's output, each transformer block's residual, or one
    # residual for the blocks between fresh_head and fresh_tail (which always run)
    granularity: Literal["module", "block", "span"] = "module"
    fresh_head: int = _f(1, ge=0, le=1000)  # span: first blocks run on every step
    fresh_tail: int = _f(1, ge=0, le=1000)  # span: last blocks run on every step
    # the model whose RCS error trace chooses the static schedule of qcache.compress: the full-precision model (the
    # trajectory the compressed one should follow) or the compressed one itself (docs/cache.md)
    schedule_on: Literal["fp", "compressed"] = "fp"

    def validate(self, path: str) -> None:
        needs_tau = self.policy == "rfc" and self.rcs and self.schedule is None
        if needs_tau and self.tau is None and self.target_nfc is None:
            raise RecipeError(f"{path}.target_nfc: rfc with rcs needs tau or target_nfc, got neither")
        if self.target_nfc is not None and self.target_nfc < self.warmup:
            raise RecipeError(f"{path}.target_nfc: must be >= warmup ({self.warmup}), got {self.target_nfc}")
        if self.tau is not None and self.target_nfc is not None:
            raise RecipeError(f"{path}.tau: give tau or target_nfc, not both (tau is tuned to target_nfc), got "
                              f"tau {self.tau!r} and target_nfc {self.target_nfc!r}")


@dataclass(frozen=True)
class OutputConfig:
    """Where results and artifacts go."""

    dir: str = "runs/digits"


QUANT_PRESETS = ("W8A8", "W4A8", "W8", "W4", "none")


@dataclass(frozen=True)
class QuantOverride:
    """Per-module quantization for the modules whose name matches ``pattern`` (fnmatch); the last match wins."""

    pattern: str
    weights: Literal["int8", "int4", "none"] = "int8"
    activations: Literal["int8", "none"] = "none"

    def validate(self, path: str) -> None:
        if self.activations != "none" and self.weights == "none":
            raise RecipeError(f"{path}.activations: int8 activations need quantized weights (weights is 'none'), "
                              f"got activations={self.activations!r}")


@dataclass(frozen=True)
class QuantConfig:
    """Post-training quantization: preset, observers, which modules stay full precision, and the backend.

    ``backend: quanto`` (default) is calibrated, portable compression; ``backend: torchao`` is the speed backend
    (dynamic int8/float8 activations, optional compute-dtype cast and ``torch.compile``, no calibration).
    """

    preset: Literal["W8A8", "W4A8", "W8", "W4", "none"] = "W8A8"
    observer: Literal["absmax", "percentile"] = "absmax"  # activation ranges over the whole calibration set
    percentile: float = _f(99.99, gt=50.0, le=100.0)  # of |x|, for observer: percentile
    quantize_outputs: bool = False  # also quantize linear outputs (int8, per tensor); the decision is saved
    # weight format of the timestep/label embedders and adaLN modulation linears (never activation-quantized):
    # preset = the preset's weight type, none = full precision
    conditioning_weights: Literal["preset", "int8", "int4", "none"] = "preset"
    keep_dtype: Literal["float32", "float16", "bfloat16"] = "float16"  # storage of unquantized tensors
    exclude: list[str] = _f([])  # extra fnmatch patterns kept in full precision
    overrides: list[QuantOverride] = _f([])
    # the speed backend (docs/speed.md): torchao int8 dynamic activations / float8, optional compute cast and
    # torch.compile. quanto (default) is the portable, calibrated compression backend.
    backend: Literal["quanto", "torchao"] = "quanto"
    compute_dtype: Literal["model", "float32", "bfloat16", "float16"] = "model"  # torchao: cast before quantizing
    compile: bool = False  # torchao: torch.compile the blocks' norm1/attention/feed-forward modules
    float8: bool = False  # torchao: 8-bit weights (and activations) in float8 e4m3 instead of int8 (CUDA sm >= 8.9)
    time_groups: int = _f(1, ge=1, le=64)  # quanto: activation scales per group of timesteps (docs/quant.md)
    # quanto: search: clip each int4 weight group's range to the alpha that minimises its output error on the
    # calibration activations (qcache.quant.weight_clip); none: quanto's min/max
    weight_clip: Literal["none", "search"] = "none"

    def validate(self, path: str) -> None:
        if self.backend == "quanto":
            for key, value, default in (("compute_dtype", self.compute_dtype, "model"),
                                        ("compile", self.compile, False), ("float8", self.float8, False)):
                if value != default:
                    raise RecipeError(f"{path}.{key}: needs backend torchao, got {short(value)} with backend 'quanto'")
            return
        if self.preset in ("W4A8", "W4"):
            raise RecipeError(f"{path}.preset: backend torchao supports W8A8, W8 and none, got {self.preset!r}")
        if self.conditioning_weights == "int4":
            raise RecipeError(f"{path}.conditioning_weights: backend torchao has no int4 here, got 'int4'")
        for i, ov in enumerate(self.overrides):
            if ov.weights == "int4":
                raise RecipeError(f"{path}.overrides[{i}].weights: backend torchao has no int4 here, got 'int4'")
        if self.quantize_outputs:
            raise RecipeError(f"{path}.quantize_outputs: backend torchao quantizes activations dynamically and "
                              f"never its outputs, got True")
        if self.observer != "absmax":
            raise RecipeError(f"{path}.observer: backend torchao takes activation ranges per token at run time "
                              f"(no observer), got {self.observer!r}")
        if self.time_groups != 1:
            raise RecipeError(f"{path}.time_groups: backend torchao has no static activation scales to group by "
                              f"timestep (only backend quanto does), got {self.time_groups}")
        if self.weight_clip != "none":
            raise RecipeError(f"{path}.weight_clip: backend torchao has no int4 weights to clip (only backend quanto "
                              f"does), got {self.weight_clip!r}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration data: a pool of model inputs sampled along (cached) trajectories, and a selector over it."""

    pool_images: int = _f(512, ge=1)  # images generated for the pool; rows = images x full steps
    pool_seed: int = _f(1234, ge=0, le=MAX_SEED)  # noise seed of the pool (keep it apart from sampling.seed)
    cache_aware: bool = True  # sample the pool with the recipe's cache active (if it has one)
    selector: Literal["random", "kmeans", "tap"] = "tap"
    size: int = _f(256, ge=1)  # calibration samples selected from the pool
    alpha: float = _f(0.5, ge=0.0, le=1.0)  # TAP: weight of content vs time similarity
    sigma: float = _f(0.1, gt=0.0)  # TAP: time scale of exp(-|tau_a - tau_b| / sigma), tau in [0, 1]
    landmarks: int = _f(0, ge=0)  # TAP: landmarks per subset; 0 = pool size / 20
    landmark_sets: int = _f(3, ge=1, le=32)  # TAP: parallel landmark subsets
    embed_dim: int = _f(16, ge=1, le=512)  # TAP: singular vectors kept per subset
    clusters: int = _f(100, ge=1)  # kmeans / TAP clusters (capped at size)
    feature_pool: int = _f(1, ge=1)  # average-pool x_t by this factor before using it as a feature
    seed: int = _f(0, ge=0, le=MAX_SEED)  # selector seed
    pool_path: str = "runs/digits/calibration/pool"
    selection_path: str = "runs/digits/calibration/selection"


@dataclass(frozen=True)
class VcConfig:
    """Variance compensation (qcache.vc): per-step, per-channel factors fitted against the FP trajectory."""

    # true | false | auto: fit, then keep only where it lowers the final-step error on the held-out batch
    enabled: Any = "auto"
    samples: int = _f(64, ge=2)  # images of the fitting batch
    seed: int = _f(2, ge=0, le=MAX_SEED)  # its noise seed (apart from sampling.seed and the calibration seeds)
    clamp_min: float = _f(0.5, gt=0.0, le=1.0)  # factors are clamped to [clamp_min, clamp_max]
    clamp_max: float = _f(1.5, ge=1.0, le=10.0)  # (the ranges keep K = 1, the identity, always allowed)
    fit: Literal["least_squares", "variance"] = "least_squares"  # K per channel: LS match, or the std ratio
    holdout_samples: int = _f(64, ge=2)  # images of the held-out batch that validates the factors
    holdout_seed: int = _f(3, ge=0, le=MAX_SEED)  # its noise seed (must differ from seed)
    min_gain: float = _f(0.01, ge=0.0, lt=1.0)  # auto keeps VC if it cuts the held-out error by more than this

    def validate(self, path: str) -> None:
        if not (isinstance(self.enabled, bool) or self.enabled == "auto"):
            raise RecipeError(f"{path}.enabled: must be true, false or 'auto', got {short(self.enabled)}")
        if self.holdout_seed == self.seed:
            raise RecipeError(f"{path}.holdout_seed: must differ from vc.seed (the fitting batch), got "
                              f"{self.holdout_seed}")


@dataclass(frozen=True)
class Recipe:
    """A whole recipe. ``model`` is required; the other sections have defaults."""

    model: ModelConfig
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    vc: VcConfig = field(default_factory=VcConfig)


# Sections a recipe may name that a later stage of qcache implements; until then they are refused.
UNSUPPORTED_SECTIONS: dict[str, str] = {}


def _check_value(path: str, tp: Any, value: Any, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(path, inner[0], value, meta)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise RecipeError(f"{path}: must be one of {', '.join(map(repr, choices))}, got {short(value)}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise RecipeError(f"{path}: must be a list, got {short(value)}")
        return tuple(_check_value(f"{path}[{i}]", item_tp, v, meta) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: must be true or false, got {short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: must be an integer, got {short(value)}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path}: must be a number, got {short(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise RecipeError(f"{path}: must be a finite number, got {short(value)}")
    elif tp is str:
        if not isinstance(value, str) or not value:
            raise RecipeError(f"{path}: must be a non-empty string, got {short(value)}")
        if "\x00" in value:
            raise RecipeError(f"{path}: must not contain a NUL character, got {short(value)}")
    elif tp is Any:
        return value
    if isinstance(value, int) and "le" not in meta and "lt" not in meta and value > INT_CEILING:
        raise RecipeError(f"{path}: must be <= {INT_CEILING}, got {short(value)}")
    if isinstance(value, (int, float)):
        for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            if key in meta and not ok(value, meta[key]):
                raise RecipeError(f"{path}: must be {word} {meta[key]}, got {short(value)}")
    return value


def build_section(cls: type, data: Any, path: str) -> Any:
    """Validate a mapping into dataclass ``cls``; ``path`` is the key path used in error messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: must be a mapping, got {short(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str):
            raise RecipeError(f"{path}: keys must be strings, got {short(key)}")
        if key not in fields:
            raise RecipeError(f"{path}.{short_str(key, 80)}: unknown key (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _check_value(f"{path}.{name}", hints[name], data[name], dict(f.metadata))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{path}.{name}: required key is missing")
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


def recipe_from_dict(data: Any) -> Recipe:
    """Validate an already-parsed recipe mapping."""
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: must be a mapping of sections, got {short(data)}")
    for key in data:
        if not isinstance(key, str):
            raise RecipeError(f"recipe: section names must be strings, got {short(key)}")
        if key in UNSUPPORTED_SECTIONS:
            raise RecipeError(f"{key}: {UNSUPPORTED_SECTIONS[key]} is not supported yet in this version of qcache")
    fields = {f.name for f in dataclasses.fields(Recipe)}
    for key in data:
        if key not in fields:
            raise RecipeError(f"{short_str(key, 80)}: unknown section (known: "
                              f"{', '.join(sorted(fields | set(UNSUPPORTED_SECTIONS)))})")
    if "model" not in data:
        raise RecipeError("model: required section is missing")
    values = {}
    hints = typing.get_type_hints(Recipe)
    for key, value in data.items():
        values[key] = build_section(hints[key], value, key)
    recipe = Recipe(**values)
    _check_cross_fields(recipe)
    return recipe


def _check_cross_fields(recipe: Recipe) -> None:
    dev = recipe.model.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise RecipeError(f"model.device: must be auto, cpu, cuda or cuda:N, got {short(dev)}")
    nfc = recipe.cache.target_nfc
    if nfc is not None and nfc > recipe.sampling.steps:
        raise RecipeError(f"cache.target_nfc: must be <= sampling.steps ({recipe.sampling.steps}), got {nfc}")


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader; ``parse_yaml`` checks the composed node graph before building Python objects."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for kv in node.value for x in kv]
    return []


def _check_expansion(root: yaml.Node, where: str, limit: int = MAX_YAML_NODES) -> None:
    """Refuse a node graph whose aliases expand to more than ``limit`` values, or that refers to itself.

    Aliases share nodes, so a few hundred bytes of YAML can stand for billions of values: harmless until something
    walks the value (an error message, the resolved recipe). Sizes are counted with shared nodes counted once per
    reference, iteratively (no recursion on deep input).
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_nodes.discard(key)
            total = 1 + sum(sizes[id(c)] for c in _children(node))
            if total > limit:
                raise RecipeError(f"recipe: {where}: aliases expand to more than {limit} values (refused)")
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise RecipeError(f"recipe: {where}: an alias refers to a value that contains it (recursive YAML)")
        open_nodes.add(key)
        stack.append((node, True))
        for c in _children(node):
            if id(c) in open_nodes:
                raise RecipeError(f"recipe: {where}: an alias refers to a value that contains it (recursive YAML)")
            if id(c) not in sizes:
                stack.append((c, False))


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML ``text`` safely (no Python objects; bounded alias expansion and nesting); ``where`` names the
    source in errors. Raises RecipeError in one line."""
    loader = None
    try:
        loader = _RecipeLoader(text)  # the reader refuses non-printable characters already here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"recipe: invalid YAML in {where}{at}: {short_str(problem)}") from None
    except RecursionError:
        raise RecipeError(f"recipe: {where}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text_file(p: Path, key: str) -> str:
    """The UTF-8 text of file ``p``; a missing file, a directory, an unreadable or undecodable file is a one-line
    RecipeError naming ``key``."""
    if p.is_dir():
        raise RecipeError(f"{key}: {short_str(p)} is a directory, expected a YAML file")
    if not p.exists():
        raise RecipeError(f"{key}: file not found: {short_str(p)}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise RecipeError(f"{key}: cannot read {short_str(p)}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{key}: {short_str(p)} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                          f"{e.start})") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    p = Path(path)
    return recipe_from_dict(parse_yaml(read_text_file(p, "recipe"), short_str(p)))


def recipe_to_dict(recipe: Recipe) -> dict:
    """The fully resolved recipe as plain data (lists, not tuples), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(recipe))
