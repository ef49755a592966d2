"""The compress report: the summary table, ``report.md`` and the PNG plots (matplotlib, Agg backend).

Plots: ``samples.png`` (the same noise and labels through the full-precision and the compressed model),
``error_per_step.png`` (relative error of x_t against the FP trajectory, with and without VC, on the fitting and the
held-out batch), ``schedule.png`` (the static full-step mask as a strip), ``quality_vs_nfc.png`` (FID-to-FP and PSNR
of the quantized model at other cache settings, the chosen one marked). Every plotted figure says in its legend how
many images it was measured on, and figures in one plot share that number: the artifact's point on the
quality-vs-NFC plot is re-measured on the sweep's images (its first n of the evaluation set, same noise).
"""

from __future__ import annotations

import io

import torch

ROWS = (  # (label, key, format)
    ("NFC", "nfc", "{:.0f}"),
    ("FLOPs / image", "flops_per_image", "{:.3g}"),
    ("FLOPs ratio", "flops_ratio", "{:.2f}x"),
    ("latency (s)", "latency_s", "{:.2f}"),
    ("latency ratio", "latency_ratio", "{:.2f}x"),
    ("size (MB)", "size_bytes", "mb"),
    ("size ratio", "size_ratio", "{:.2f}x"),
    ("FID to FP", "fid_to_fp", "{:.3f}"),
    ("FID vs data", "fid_data", "{:.2f}"),
    ("class accuracy", "class_accuracy", "{:.3f}"),
    ("PSNR vs FP (dB)", "psnr", "{:.2f}"),
)


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "mb":
        return f"{value / 1e6:.2f}"
    return fmt.format(value)


def summary_table(report: dict) -> str:
    """Markdown table: one row per metric, columns full precision and compressed."""
    fp, c = report["full_precision"], report["compressed"]
    lines = ["| metric | full precision | compressed |", "|---|---:|---:|"]
    for label, key, fmt in ROWS:
        lines.append(f"| {label} | {_fmt(fp.get(key), fmt)} | {_fmt(c.get(key), fmt)} |")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    """``report.md``: what was built, the summary table, stage timings and the plots."""
    s, sched, vc = report["setup"], report.get("schedule") or {}, report.get("vc") or {}
    out = [
        f"# qcache report: {s['model_source']}",
        "",
        f"quant {s['quant']}, cache {s['cache']} (NFC {report['compressed']['nfc']} of {s['steps']} "
        f"{s['scheduler']} steps, CFG {s['guidance_scale']}), VC {'on' if vc.get('enabled') else 'off'}; "
        f"calibration {s['calibration']}. {report['n']} images per model from seed {s['seed']}; latency: median of "
        f"{report['latency_repeats']} runs of {report['latency_samples']} images on {s['device']} "
        f"({s['threads']} threads).",
        "",
        summary_table(report),
        "",
        "PSNR of the full-precision column is the 100 dB cap (identical images).",
        "",
    ]
    if sched.get("full_steps") is not None:
        tau = sched.get("tau")
        out += [f"**Cache schedule**: full steps {sched['full_steps']}" + (f" (tau = {tau:.4g})" if tau else ""),
                ""]
    if "min" in vc:  # factors were fitted (kept or not)
        line = (f"**VC** ({vc.get('mode', 'on')}, fit {vc.get('fit', 'least_squares')}): "
                f"{'kept' if vc.get('enabled') else 'dropped'}; factors in [{vc['min']:.3f}, {vc['max']:.3f}], mean "
                f"{vc['mean']:.3f}; final-step error against FP on the fitting batch {vc['final_error_without']:.4f} "
                f"without VC, {vc['final_error_with']:.4f} with")
        if "heldout_error_with" in vc:
            line += (f"; on the held-out batch ({vc.get('heldout_samples', '?')} images, other noise) "
                     f"{vc['heldout_error_without']:.4f} without, {vc['heldout_error_with']:.4f} with")
        out += [line + ".", ""]
    out += ["| stage | seconds | reused |", "|---|---:|---|"]
    out += [f"| {name} | {st['seconds']:.1f} | {'yes' if st['reused'] else 'no'} |"
            for name, st in report["stages"].items()]
    out += ["", "![samples](plots/samples.png)", "![error per step](plots/error_per_step.png)",
            "![schedule](plots/schedule.png)", "![quality against NFC](plots/quality_vs_nfc.png)", ""]
    return "\n".join(out)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _figure(*args, **kw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kw)


def plot_samples(reference: torch.Tensor, compressed: torch.Tensor, per_row: int = 10, rows: int = 2) -> bytes:
    """The first ``per_row * rows`` images of both models side by side (same noise, same labels)."""
    from .images import make_grid

    k = min(per_row * rows, len(reference))
    fig, axes = _figure(1, 2, figsize=(10, 2.6))
    for ax, imgs, title in ((axes[0], reference, "full precision"), (axes[1], compressed, "compressed")):
        grid = make_grid(imgs[:k], nrow=per_row)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title)
        ax.axis("off")
    return _png(fig)


def plot_error_per_step(curves: dict, full_steps: list[int] | None, vc: dict | None = None) -> bytes:
    """Relative error of x_t per step; ``vc`` (the report's VC info) names the batches' sizes and the decision."""
    vc = vc or {}
    fit_n, held_n = vc.get("samples"), vc.get("heldout_samples")
    tag = "" if vc.get("enabled", True) else " (not kept)"
    fig, ax = _figure(figsize=(7, 3.2))
    for key, label, style in (("without_vc", f"quantized + cache, fitting batch{_n(fit_n)}", "-"),
                              ("with_vc", f"+ VC{tag}, fitting batch{_n(fit_n)}", "-"),
                              ("heldout_without_vc", f"quantized + cache, held-out batch{_n(held_n)}", "--"),
                              ("heldout_with_vc", f"+ VC{tag}, held-out batch{_n(held_n)}", "--")):
        if key in curves:
            ax.plot(range(len(curves[key])), curves[key], style, label=label)
    for i in full_steps or []:
        ax.axvline(i, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("step (grey: full steps)")
    ax.set_ylabel("rel. L2 error of x_t vs FP")
    ax.set_yscale("log")
    ax.legend()
    return _png(fig)


def plot_schedule(steps: int, full_steps: list[int] | None) -> bytes:
    fig, ax = _figure(figsize=(8, 0.9))
    full = set(range(steps)) if full_steps is None else set(full_steps)
    ax.imshow([[1.0 if i in full else 0.0 for i in range(steps)]], cmap="Greys", aspect="auto", vmin=0, vmax=1.2)
    ax.set_yticks([])
    ax.set_xlabel(f"step (dark: full computation, {len(full)} of {steps})")
    return _png(fig)


def _n(n) -> str:
    return f", n={n}" if n else ""


def plot_quality_vs_nfc(points: list[dict], chosen: dict, chosen_n: int | None = None, vc: bool | None = None) -> bytes:
    """FID-to-FP against NFC; PSNR against NFC for models without a FID feature network (fid_to_fp null).

    ``chosen``: the artifact's figures measured on ``chosen_n`` images (pass them on the sweep's images, so the
    plot compares figures on one n); ``vc``: whether the artifact applies VC (the sweep never does)."""
    fig, ax = _figure(figsize=(6, 3.4))
    pts = sorted(points, key=lambda p: p["nfc"])
    key = "fid_to_fp" if chosen.get("fid_to_fp") is not None else "psnr"
    if pts:
        ax.plot([p["nfc"] for p in pts], [p[key] for p in pts], "o-",
                label=f"quantized + cache (no VC){_n(pts[0].get('n'))}")
    vc_tag = "" if vc is None else (", VC on" if vc else ", no VC")
    ax.plot([chosen["nfc"]], [chosen[key]], "r*", ms=12, label=f"this artifact{vc_tag}{_n(chosen_n)}")
    ax.set_xlabel("NFC")
    if key == "fid_to_fp":
        ax.set_ylabel("FID to FP")
        ax.set_yscale("symlog", linthresh=0.1)
    else:
        ax.set_ylabel("PSNR vs FP (dB)")
    ax.legend()
    return _png(fig)


def plots(report: dict, reference: torch.Tensor, compressed: torch.Tensor) -> dict[str, bytes]:
    """Every plot of the report, as ``plots/NAME.png`` -> PNG bytes."""
    sched = report.get("schedule") or {}
    steps = report["setup"]["steps"]
    vc = dict(report.get("vc") or {})
    vc.setdefault("samples", ((report.get("recipe") or {}).get("vc") or {}).get("samples"))
    points = report.get("quality_vs_nfc") or []
    chosen, chosen_n = report["compressed"], report.get("n")
    sweep_n = points[0].get("n") if points else None
    if sweep_n and sweep_n != chosen_n and len(reference) >= sweep_n and len(compressed) >= sweep_n:
        from .metrics import compare_sets  # the artifact on the sweep's images: one n per plot

        chosen = {"nfc": chosen["nfc"], **compare_sets(reference[:sweep_n], compressed[:sweep_n])}
        chosen_n = sweep_n
    return {
        "plots/samples.png": plot_samples(reference, compressed),
        "plots/error_per_step.png": plot_error_per_step(report.get("error_per_step") or {}, sched.get("full_steps"),
                                                        vc),
        "plots/schedule.png": plot_schedule(steps, sched.get("full_steps")),
        "plots/quality_vs_nfc.png": plot_quality_vs_nfc(points, chosen, chosen_n, vc.get("enabled")),
    }
