"""Data-parallel scaling of ``qcache.sample``: wall time of N images with 1 process against K processes.

    python tools/bench_scale.py [--recipe R] [--n 256] [--processes 2] [--threads 1] [--batch-size 32]
                                [--repeats 3] [--device cpu] [--no-breakdown] [--json PATH]

Headline (``single_s``, ``parallel_s``, ``ratio``): end-to-end wall time of the real commands, from starting the
interpreter to its exit, median of ``--repeats``: ``python -m qcache.sample RECIPE --n N --out DIR`` against
``accelerate launch --multi_gpu --num_processes K -m qcache.sample ...`` (torchrun-style processes; gloo on CPU),
every process given ``--threads`` threads (OMP_NUM_THREADS and MKL_NUM_THREADS; torch reads them). The runs of the
two settings alternate, each into a fresh output directory. The exact commands are in ``commands``.

Breakdown (``breakdown``; off with ``--no-breakdown``): the same sampling once more per repeat and setting, through
this script's worker, which runs ``qcache.sample``'s own ``main`` under the same launcher and times its parts in
the process: ``launch_s`` (launcher and interpreter start until the worker's first line), ``import_s`` (torch and
qcache), ``load_s`` (model and sampler) and ``sample_s`` (``sample_to``: the sampling, between barriers, so the
slowest rank's time). ``sample_ratio`` compares the sampling sections alone; ``fixed_s`` is what does not shrink
with more processes. ``threads_measured`` is ``torch.get_num_threads()`` in the workers.
"""

from __future__ import annotations

import time

T_START = time.time()  # the worker's first line: what came before is the launcher's and the interpreter's start

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from common import DIGITS_RECIPE, REPO, QcacheError, run_cli, write_json  # noqa: E402

WORKER_FLAG = "--worker-json"
PARTS = ("launch_s", "import_s", "load_s", "sample_s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(procs: int) -> list[str]:
    """The interpreter command that starts ``procs`` processes: plain python for one, accelerate for several."""
    if procs == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def sample_args(args: argparse.Namespace, out: Path) -> list[str]:
    return [str(args.recipe), "--n", str(args.n), "--batch-size", str(args.batch_size), "--device", args.device,
            "--out", str(out), "--no-progress"]


def environment(threads: int, device: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # no process group on a GPU for a CPU measurement
    return env


def run_timed(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of ``cmd`` (run in the repository root); a failure is one error line."""
    env = {**env, "BENCH_LAUNCH_T": repr(time.time())}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")] or p.stderr.strip().splitlines()
        raise QcacheError(f"benchmark: {shlex.join(cmd[:4])} ... failed (exit {p.returncode}): "
                          f"{lines[-1] if lines else 'no output'}")
    return took


def measure(args: argparse.Namespace) -> dict:
    env = environment(args.threads, args.device)
    settings = {"single": 1, "parallel": args.processes}
    wall: dict[str, list[float]] = {k: [] for k in settings}
    parts: dict[str, list[dict]] = {k: [] for k in settings}
    commands: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_scale.") as tmp:
        for r in range(args.repeats):
            order = list(settings) if r % 2 == 0 else list(settings)[::-1]  # alternate: no setting always first
            for name in order:
                procs = settings[name]
                out = Path(tmp) / f"{name}-{r}"
                cmd = [*launcher(procs), "-m", "qcache.sample", *sample_args(args, out)]
                commands[name] = shlex.join(["env", f"OMP_NUM_THREADS={args.threads}",
                                             f"MKL_NUM_THREADS={args.threads}", *cmd])
                wall[name].append(run_timed(cmd, env))
                print(f"[{r + 1}/{args.repeats}] {name} ({procs} process{'es' if procs > 1 else ''}): "
                      f"{wall[name][-1]:.2f}s", file=sys.stderr, flush=True)
                if args.breakdown:
                    js = Path(tmp) / f"{name}-{r}.json"
                    wcmd = [*launcher(procs), str(Path(__file__).resolve()), WORKER_FLAG, str(js), "--",
                            *sample_args(args, Path(tmp) / f"{name}-{r}-worker")]
                    run_timed(wcmd, env)
                    parts[name].append(json.loads(js.read_text()))
    single, parallel = statistics.median(wall["single"]), statistics.median(wall["parallel"])
    report = {
        "n": args.n, "recipe": str(args.recipe), "batch_size": args.batch_size, "device": args.device,
        "processes": args.processes, "threads_per_process": args.threads, "repeats": args.repeats,
        "single_s": round(single, 3), "parallel_s": round(parallel, 3), "ratio": round(parallel / single, 4),
        "single_runs_s": [round(x, 3) for x in wall["single"]],
        "parallel_runs_s": [round(x, 3) for x in wall["parallel"]],
        "commands": commands, "command": commands["parallel"],
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
    }
    if args.breakdown:
        report["breakdown"] = breakdown(parts)
    return report


def breakdown(parts: dict[str, list[dict]]) -> dict:
    """Medians of each timed part per setting (the slowest rank's, per run), and what they add up to."""
    out: dict = {}
    for name, runs in parts.items():
        med = {k: round(statistics.median(max(rank[k] for rank in run["ranks"]) for run in runs), 3) for k in PARTS}
        med["fixed_s"] = round(med["launch_s"] + med["import_s"] + med["load_s"], 3)
        med["threads_measured"] = sorted({rank["threads"] for run in runs for rank in run["ranks"]})
        out[name] = med
    out["sample_ratio"] = round(out["parallel"]["sample_s"] / out["single"]["sample_s"], 4)
    out["dominant_fixed_part"] = max(("launch_s", "import_s", "load_s"), key=lambda k: out["parallel"][k])
    return out


# ---- the worker: qcache.sample's main under the launcher, with its parts timed in the process -----------------------
def worker(json_path: str, argv: list[str]) -> None:
    import torch

    from qcache import distributed
    from qcache import sample as qs

    imported = time.time()
    timed: dict[str, float] = {}
    open_source, sample_to = qs.open_source, qs.sample_to

    def timed_open(*a, **k):
        t = time.perf_counter()
        src = open_source(*a, **k)
        timed["load_s"] = time.perf_counter() - t
        return src

    def timed_sample(*a, **k):
        d = distributed.current()
        d.barrier()  # every rank starts together, and the last one to finish ends it
        t = time.perf_counter()
        res = sample_to(*a, **k)
        d.barrier()
        timed["sample_s"] = time.perf_counter() - t
        return res

    qs.open_source, qs.sample_to = timed_open, timed_sample
    sys.argv = ["python -m qcache.sample", *argv]
    launched = float(os.environ.get("BENCH_LAUNCH_T", T_START))

    def entry() -> None:
        qs.main()
        d = distributed.current()
        row = {"rank": d.rank, "launch_s": T_START - launched, "import_s": imported - T_START, **timed,
               "threads": torch.get_num_threads()}
        rows = d.gather(row)
        if d.is_main:
            write_json(json_path, {"ranks": rows})

    distributed.main(entry)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=DIGITS_RECIPE, help="the recipe to sample (full precision)")
    ap.add_argument("--n", type=int, default=256, help="images per run")
    ap.add_argument("--processes", type=int, default=2, help="processes of the parallel setting")
    ap.add_argument("--threads", type=int, default=1, help="threads per process (OMP_NUM_THREADS)")
    ap.add_argument("--batch-size", type=int, default=32, help="qcache.sample's --batch-size (chunk per process)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per setting; medians are reported")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="qcache.sample's --device")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                    help="skip the in-process timing of launch, import, load and sampling")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    args = ap.parse_args()
    for key, value, low in (("--n", args.n, 1), ("--processes", args.processes, 2), ("--threads", args.threads, 1),
                            ("--batch-size", args.batch_size, 1), ("--repeats", args.repeats, 1)):
        if value < low:
            raise QcacheError(f"{key}: must be >= {low}, got {value}")
    if not args.recipe.is_file():
        raise QcacheError(f"--recipe: no such file {args.recipe}")
    args.recipe = args.recipe.resolve()
    report = measure(args)
    text = json.dumps(report, indent=2)
    if args.json is not None:
        write_json(args.json, report)
    print(text)
    b = report.get("breakdown")
    print(f"{args.n} images: 1 process {report['single_s']:.2f}s, {args.processes} processes "
          f"{report['parallel_s']:.2f}s, ratio {report['ratio']:.3f}"
          + (f"; sampling alone ratio {b['sample_ratio']:.3f}, fixed per-process cost "
             f"{b['parallel']['fixed_s']:.2f}s (largest: {b['dominant_fixed_part']})" if b else ""),
          file=sys.stderr)


if __name__ == "__main__":
    if WORKER_FLAG in sys.argv:
        i = sys.argv.index(WORKER_FLAG)
        rest = sys.argv[i + 2:]
        worker(sys.argv[i + 1], rest[1:] if rest[:1] == ["--"] else rest)
    else:
        run_cli(main)
