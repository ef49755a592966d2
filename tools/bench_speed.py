"""Speed benchmark: end-to-end sampling latency of full precision against RFC caching, int8/fp8 and both together.

    python tools/bench_speed.py --json docs/results/bench_speed_gpu.json      # CUDA: DiT-XL/2, bf16, compile
    python tools/bench_speed.py --json docs/results/bench_speed_cpu.json      # CPU: mid-size DiT

The model is a ``DiTTransformer2DModel`` with random weights (speed does not depend on them): DiT-XL/2 at 256x256
(latent 32) on a GPU, or the mid-size DiT-S/2 (12 blocks of width 384, 6 heads) at the same 256x256 on a CPU.
Sampling is the library's own loop (``qcache.sampling.Sampler``): DDIM, 50 steps, classifier-free guidance 1.5 (one
batch of 2 x batch rows per model call), batch 8. Every configuration is timed in interleaved rounds in this same
run and ``latency_ratio`` = median time of the baseline / median time of the row.

The baseline is full precision bf16, with regional ``torch.compile`` like every other variant (``--compile auto``:
on wherever the backend compiles a test function). A CPU without bf16 units (a bf16 GEMM slower than fp32, timed
at the start) has an fp32 baseline instead (``--baseline`` overrides); there the bf16 row times ``--slow-steps``
steps and scales them (``extrapolated: true``). On CPU every row also reports ``latency_ratio_vs_fp32`` when the
baseline is bf16, and the RFC schedules run on each full precision as well as on int8.

Caching uses the public cache API: an evenly spread static schedule of NFC full steps (``uniform_full_steps``,
warm-up 2) replayed (``replay``) with the rfc policy's forecasts (RFE, order 2) and ``rcs: false``. With random
weights a tuned tau would mean nothing, and a static schedule has an exact, deterministic cost.
Quantization uses qcache's torchao speed backend (``QuantConfig(backend="torchao")``): W8A8 int8 dynamic, and on
GPUs of compute capability >= 8.9 float8 too. On CPU the int8 variant computes around its GEMMs in float32
(faster there than bf16, whose activation quantization costs more).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (  # noqa: F401
    COMMON,
    FULL,
    MID,
    SCHEDULER,
    interleaved_times,
    log,
    one_line,
    random_dit,
    run_cli,
    wall_time,
    write_json,
)

from qcache.cache import StaticSchedule, replay, uniform_full_steps  # noqa: E402
from qcache.errors import QcacheError  # noqa: E402
from qcache.metrics import psnr  # noqa: E402
from qcache.quant import compile_regions, cpu_int_mm_route, forced_cpu_int_mm_route, quantize_transformer  # noqa: E402
from qcache.quant.torchao_backend import require_torchao  # noqa: E402
from qcache.recipe import CacheConfig, QuantConfig, SamplingConfig  # noqa: E402
from qcache.sampling import Sampler  # noqa: E402

WARMUP = 2


@dataclass
class Variant:
    """One model build: a torchao speed-backend config applied to a copy of the random base model."""

    name: str
    quant: str  # none | int8 W8A8 | float8 W8A8
    cfg: QuantConfig
    compile: bool = False  # regional torch.compile (qcache.quant.compile_regions) after quantizing
    model: torch.nn.Module | None = None


@dataclass
class Config:
    """One timed row: a model variant, with or without a cache schedule."""

    name: str
    variant: Variant
    schedule: StaticSchedule | None
    repeats: int
    timed_steps: int  # steps really sampled; the time is scaled to the full step count when fewer
    times: list[float] = dataclasses.field(default_factory=list)
    output: torch.Tensor | None = None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def build_base(dims: dict, seed: int, device: torch.device) -> torch.nn.Module:
    """The random-weight DiT of ``dims`` (``common.random_dit``)."""
    return random_dit(dims, seed, device)


def variants(gpu_profile: bool, compile_on: bool, float8: bool, int8: bool,
             cpu_baseline: str = "fp32") -> list[Variant]:
    """The model builds of this run; the first one is the baseline (``cpu_baseline``: fp32 or bf16, CPU only)."""
    def ao(preset: str, dtype: str, f8: bool = False) -> QuantConfig:
        return QuantConfig(backend="torchao", preset=preset, compute_dtype=dtype, float8=f8, keep_dtype="float32")

    c = compile_on
    if gpu_profile:
        out = [Variant("bf16", "none", ao("none", "bfloat16"), c)]
        if c:
            out.append(Variant("bf16 eager", "none", ao("none", "bfloat16"), False))
        if int8:
            out.append(Variant("int8", "int8 W8A8 (dynamic)", ao("W8A8", "bfloat16"), c))
        if float8:
            out.append(Variant("fp8", "float8 W8A8 (dynamic, per row)", ao("W8A8", "bfloat16", True), c))
        return out
    out = [Variant("fp32", "none", ao("none", "float32"), c), Variant("bf16", "none", ao("none", "bfloat16"), c)]
    if cpu_baseline == "bf16":
        out.reverse()
    if int8:  # float32 around the int8 GEMMs: on CPU faster than bf16 there (the activations' quantization)
        out.append(Variant("int8", "int8 W8A8 (dynamic)", ao("W8A8", "float32"), c))
    return out


def compile_works(backend: str, device: torch.device) -> str | None:
    """None when ``torch.compile`` with ``backend`` runs a tiny function on ``device``; else why not (one line)."""
    try:
        fn = torch.compile(lambda x: x * 2 + 1, dynamic=False, backend=backend)
        fn(torch.ones(8, device=device))
        return None
    except Exception as exc:  # noqa: BLE001 - any compiler failure (no C++ compiler, unknown backend)
        return one_line(exc)


def rfc_schedule(steps: int, nfc: int) -> StaticSchedule:
    """Evenly spread NFC full steps (warm-up 2), replayed with RFE forecasts of order 2 and no RCS."""
    full = tuple(uniform_full_steps(steps, WARMUP, nfc))
    params = {"order": 2, "warmup": WARMUP, "rfe": True, "rcs": False, "target_nfc": nfc, "expansion": "newton",
              "store_dtype": "model"}
    return StaticSchedule("ddim", steps, full, "rfc", params)


def run_once(sampler: Sampler, schedule: StaticSchedule | None, n: int, seed: int,
             cache_compile: bool = False) -> tuple[float, torch.Tensor, float]:
    """Wall time of sampling n images with the schedule replayed; returns (seconds, images, NFC).

    ``cache_compile``: the cache's fused step functions (``cache.compile``) on cached steps."""
    cache = replay(sampler, schedule, CacheConfig(compile=cache_compile)) if schedule is not None else None
    try:
        dt, out = wall_time(lambda: sampler.sample(n, seed=seed, progress=False).images, sampler.device)
    finally:
        if cache is not None:
            sampler.hooks.remove(cache)
            cache.remove()
    nfc = cache.stats.mean_nfc() if cache is not None else float(sampler.config.steps)
    return dt, out, nfc


def psnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """PSNR of a row's samples against the baseline's (``qcache.metrics.psnr``), over the baseline's value range:
    the samples are latents of random weights, not images in [-1, 1]."""
    return psnr(ref, x, data_range=float(ref.max() - ref.min()))


def gemm_microbench(device: torch.device, width: int, tokens: int) -> dict:
    """Median seconds of one (tokens x width) @ (width x 4 width) matmul in float32 and bfloat16."""
    out = {"shape": [tokens, width, 4 * width]}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(tokens, width, device=device, dtype=dtype)
        b = torch.randn(width, 4 * width, device=device, dtype=dtype)
        (ts,) = interleaved_times([lambda a=a, b=b: a @ b], 3, warmup=[lambda a=a, b=b: a @ b], device=device)
        out[str(dtype).removeprefix("torch.")] = statistics.median(ts)
    out["bf16_over_fp32"] = out["bfloat16"] / out["float32"]
    return out


def forward_microbench(variants_: list[Variant], batch: int, sample: int, device: torch.device) -> dict:
    """Seconds of one model call (2 x batch rows, as with CFG) per variant; on CPU also int8 with torch._int_mm.
    (tools/step_costs.py times the calls of whole sampling runs, full and cached.)"""
    x = torch.randn(2 * batch, COMMON["in_channels"], sample, sample, device=device)
    t = torch.full((2 * batch,), 500, device=device)
    y = torch.arange(2 * batch, device=device) % 1000
    out = {}

    def once(m: torch.nn.Module) -> float:
        dtype = next(m.parameters()).dtype

        def call():
            with torch.no_grad():
                return m(x.to(dtype), timestep=t, class_labels=y)

        return interleaved_times([call], 1, warmup=[call], device=device)[0][0]  # warm-up: compilation

    for v in variants_:
        out[v.name] = once(v.model)
    int8 = next((v for v in variants_ if v.name == "int8"), None)
    if device.type == "cpu" and int8 is not None and not int8.compile:
        # both exact CPU int8 GEMM routes, whichever the run itself uses ("int8" above)
        for route, label in (("native", "int8 (native torch._int_mm)"), ("float", "int8 (exact float route)")):
            with forced_cpu_int_mm_route(route):
                out[label] = once(int8.model)
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="write the rows here")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    ap.add_argument("--full-size", action="store_true", help="DiT-XL/2 with the GPU profile (bf16 baseline, "
                    "compile) also on CPU: checks the GPU code path")
    ap.add_argument("--layers", type=int, default=None, help="override the number of blocks")
    ap.add_argument("--latent", type=int, default=None, help="override the latent size (sample_size)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8, help="images per batch (CFG doubles the model batch)")
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--nfcs", default="14,10", help="NFC of the RFC rows")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    ap.add_argument("--slow-steps", type=int, default=None,
                    help="bf16 row on a CPU without bf16 units (where bf16 is an order of magnitude slower): time "
                         "this many steps and scale to --steps (default 3; every uncached step costs the same)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="regional torch.compile of every variant (baseline included); auto: on, and off with a "
                         "message where the backend cannot compile (no C++ compiler, say)")
    ap.add_argument("--baseline", choices=("auto", "fp32", "bf16"), default="auto",
                    help="CPU baseline precision; auto: bf16 where a bf16 GEMM beats fp32 (the CPU has bf16 units), "
                         "else fp32. GPUs always use bf16")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: code path check)")
    ap.add_argument("--cache-compile", choices=("auto", "on", "off"), default="auto",
                    help="fuse the cache's per-module arithmetic with torch.compile (cache.compile; the model's own "
                         "computation and the baselines are untouched by it); auto: on, and off again with a "
                         "message if compiling fails (no C++ compiler, say)")
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--no-float8", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def build_configs(vs: list[Variant], nfcs: list[int], steps: int, repeats: int, slow_steps: int,
                  gpu_profile: bool, slow_bf16: bool = True) -> list[Config]:
    """Rows: every variant uncached, then each RFC NFC on the baseline, on every quantized variant and (CPU) on the
    other full precision. ``slow_bf16``: the CPU has no bf16 units, so its bf16 row times only ``slow_steps`` steps
    and is not cached."""
    scheds = {n: rfc_schedule(steps, n) for n in nfcs}
    slow = {v.name for v in vs if not gpu_profile and slow_bf16 and v.name == "bf16" and v is not vs[0]}
    cached_variants = [v for v in vs if (v is vs[0] or v.quant != "none" or not gpu_profile) and v.name not in slow]
    configs = []
    for v in vs:
        configs.append(Config(f"FP {v.name}" if v.quant == "none" else v.name, v, None, repeats,
                              timed_steps=slow_steps if v.name in slow else steps))
    for v in cached_variants:
        for n in nfcs:
            name = f"RFC NFC{n}" if v is vs[0] else f"{v.name} + RFC NFC{n}"
            configs.append(Config(name, v, scheds[n], repeats, timed_steps=steps))
    return configs


def main() -> None:
    args = parse_args()
    dev = args.device
    device = torch.device("cuda" if dev == "auto" and torch.cuda.is_available() else "cpu" if dev == "auto" else dev)
    gpu_profile = device.type == "cuda" or args.full_size
    compile_on = args.compile != "off"
    if args.compile == "auto" and (why := compile_works(args.compile_backend, device)) is not None:
        log(f"torch.compile failed on a test function ({why}); --compile auto falls back to off")
        compile_on = False
    dims = dict(FULL if gpu_profile else MID)
    if args.layers:
        dims["num_layers"] = args.layers
    if args.latent:
        dims["sample_size"] = args.latent
    nfcs = [int(n) for n in args.nfcs.split(",") if n]
    if any(not WARMUP <= n <= args.steps for n in nfcs):
        raise QcacheError(f"--nfcs: every NFC must be between {WARMUP} and --steps ({args.steps}), got {nfcs}")
    float8 = (not args.no_float8 and device.type == "cuda"
              and torch.cuda.get_device_capability(device) >= (8, 9))
    require_torchao()  # every variant, the baselines included, is built by the torchao speed backend
    slow_steps = args.slow_steps if args.slow_steps is not None else (args.steps if gpu_profile else 3)
    if not 1 <= slow_steps <= args.steps:
        raise QcacheError(f"--slow-steps: must be between 1 and --steps ({args.steps}), got {slow_steps}")
    sampling = SamplingConfig(steps=args.steps, guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch)
    log(f"{device_name(device)}; model {dims}; {args.steps} DDIM steps, CFG {args.guidance}, batch {args.batch}; "
        f"compile {compile_on}; threads {torch.get_num_threads()}")

    gemm = gemm_microbench(device, dims["num_attention_heads"] * dims["attention_head_dim"],
                           2 * args.batch * (dims["sample_size"] // COMMON["patch_size"]) ** 2)
    bf16_fast = gemm["bf16_over_fp32"] < 1.0
    cpu_baseline = args.baseline if args.baseline != "auto" else "bf16" if bf16_fast else "fp32"
    base = build_base(dims, args.seed, device)
    vs = variants(gpu_profile, compile_on, float8, not args.no_int8, cpu_baseline)
    ratio = "" if gpu_profile else f" (bf16 GEMM / fp32 GEMM = {gemm['bf16_over_fp32']:.2f})"
    log(f"baseline: FP {vs[0].name}{ratio}")
    for v in vs:
        t0 = time.perf_counter()
        v.model = quantize_transformer(copy.deepcopy(base), v.cfg)
        if v.compile:
            compile_regions(v.model, backend=args.compile_backend)
        log(f"variant {v.name}: {v.quant}, {v.cfg.compute_dtype}, compile {v.compile}, "
            f"built in {time.perf_counter() - t0:.1f}s")
    del base
    configs = build_configs(vs, nfcs, args.steps, args.repeats, slow_steps, gpu_profile, slow_bf16=not bf16_fast)
    samplers = {(v.name, c.timed_steps): Sampler(v.model, SCHEDULER, dataclasses.replace(sampling, steps=c.timed_steps))
                for c in configs for v in [c.variant]}

    # warm-up: compilation (same batch, so no recompilation later) and first-call costs. Every shape the timed runs
    # meet: cached steps after one and after two differences (steps 2 and 4), full steps that add the first, the
    # second (from one stored row, step 3) and a renewed second difference (from two stored rows, step 5)
    cache_compile = args.cache_compile != "off"
    if cache_compile and args.compile_backend != "inductor":
        from qcache.cache import fused

        fused.BACKEND = args.compile_backend
    warm = SamplingConfig(steps=6, guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch)
    warm_sched = StaticSchedule("ddim", 6, (0, 1, 3, 5), "rfc", rfc_schedule(args.steps, WARMUP).params)
    for v in vs:
        t0 = time.perf_counter()
        try:
            run_once(Sampler(v.model, SCHEDULER, warm), warm_sched, args.batch, args.seed, cache_compile)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: auto falls back to the eager cache
            if args.cache_compile != "auto" or not cache_compile:
                raise
            log(f"cache.compile failed ({one_line(exc)}); --cache-compile auto falls back to off")
            cache_compile = False
            run_once(Sampler(v.model, SCHEDULER, warm), warm_sched, args.batch, args.seed, cache_compile)
        log(f"warm-up {v.name}: {time.perf_counter() - t0:.1f}s")

    micro = {"gemm": gemm}
    micro["forward_s"] = forward_microbench(vs, args.batch, dims["sample_size"], device)
    log(f"microbenchmarks: {micro}")

    report = {"complete": False}
    for r in range(max(c.repeats for c in configs)):
        for c in configs:
            if len(c.times) >= c.repeats:
                continue
            dt, out, nfc = run_once(samplers[c.variant.name, c.timed_steps], c.schedule, args.batch, args.seed,
                                    cache_compile)
            c.times.append(dt * args.steps / c.timed_steps)
            c.output = out if c.output is None else c.output
            log(f"round {r + 1}: {c.name:28s} {dt:8.2f}s  nfc {nfc:.0f}  ({c.timed_steps} steps)")
        report = make_report(args, configs, device, dims, compile_on, micro, complete=False,
                             cache_compile=cache_compile)
        write_json(args.json, report)
    report = make_report(args, configs, device, dims, compile_on, micro, complete=True,
                         cache_compile=cache_compile)
    write_json(args.json, report)
    print_table(report["rows"])
    if "acceptance" in report:
        log(f"acceptance: {report['acceptance']}")


def make_report(args: argparse.Namespace, configs: list[Config], device: torch.device, dims: dict,
                compile_on: bool, micro: dict, complete: bool, cache_compile: bool = False) -> dict:
    import torchao

    base = configs[0]
    base_t = statistics.median(base.times)
    fp32 = next((c for c in configs if c.name == "FP fp32" and c.times), None)
    today = datetime.date.today().isoformat()
    rows = []
    for c in configs:
        if not c.times:
            continue
        lat = statistics.median(c.times)
        rows.append({
            "config": c.name, "nfc": c.schedule.nfc if c.schedule else args.steps, "latency_s": lat,
            "latency_ratio": base_t / lat, "device": device_name(device), "dtype": c.variant.cfg.compute_dtype,
            "date": today, "quant": c.variant.quant, "cache": "rfc (static, rfe, no rcs)" if c.schedule else "none",
            "full_steps": list(c.schedule.full_steps) if c.schedule else None, "compile": c.variant.compile,
            "cache_compile": bool(c.schedule) and cache_compile,
            "runs_s": c.times, "baseline": c is base, "timed_steps": c.timed_steps,
            "extrapolated": c.timed_steps != args.steps,
            "psnr_vs_baseline_db": psnr_db(base.output, c.output) if c.timed_steps == args.steps else None,
        })
        if fp32 is not None and fp32 is not base:  # a bf16 baseline: the ratios against fp32 too
            rows[-1]["latency_ratio_vs_fp32"] = statistics.median(fp32.times) / lat
    report = {
        "rows": rows, "complete": complete, "baseline": base.name, "model": {**dims, **COMMON},
        "steps": args.steps, "batch": args.batch, "guidance_scale": args.guidance, "scheduler": "ddim",
        "repeats": args.repeats, "compile": compile_on, "compile_backend": args.compile_backend,
        "cache_compile": cache_compile,
        "schedule_note": "evenly spread NFC full steps (warm-up 2), replayed with RFE order-2 forecasts, rcs off; "
                         "random weights, so tau tuning would be meaningless",
        "psnr_note": "random weights: psnr_vs_baseline_db is a sanity check of each path, not image quality",
        "microbench": micro, "device": device_name(device), "threads": torch.get_num_threads(),
        "cpu_int_mm_route": cpu_int_mm_route() if device.type == "cpu" and any(
            c.variant.quant.startswith("int8") for c in configs) else None,
        "torch": torch.__version__, "torchao": torchao.__version__, "command": " ".join(sys.argv),
    }
    by_name = {r["config"]: r for r in rows}
    nfc14 = by_name.get("RFC NFC14")
    if device.type == "cpu" and nfc14 is not None:
        acc = report["acceptance"] = {"baseline": base.name, "rfc_nfc14_latency_ratio": nfc14["latency_ratio"],
                                      "ratio_ge_3": nfc14["latency_ratio"] >= 3.0}
        both = by_name.get("int8 + RFC NFC14")
        if both is not None:  # the same NFC with the speed backend's int8 on top
            acc.update({"int8_rfc_nfc14_latency_ratio": both["latency_ratio"],
                        "int8_ratio_ge_3": both["latency_ratio"] >= 3.0})
        for key, name in (("rfc_nfc14", "RFC NFC14"), ("fp32_rfc_nfc14", "fp32 + RFC NFC14"),
                          ("int8_rfc_nfc14", "int8 + RFC NFC14")):
            if "latency_ratio_vs_fp32" in by_name.get(name, {}):  # a bf16 baseline: the same rows against fp32
                acc[f"{key}_latency_ratio_vs_fp32"] = by_name[name]["latency_ratio_vs_fp32"]
    return report


def print_table(rows: list[dict]) -> None:
    print("| config | nfc | dtype | quant | latency_s | latency_ratio | psnr_vs_baseline_db |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["psnr_vs_baseline_db"]
        print(f"| {r['config']} | {r['nfc']} | {r['dtype']} | {r['quant']} | {r['latency_s']:.3f} | "
              f"{r['latency_ratio']:.2f} | {'-' if p is None or math.isinf(p) else f'{p:.1f}'} |")


if __name__ == "__main__":
    run_cli(main)
