"""The report's plots compare figures on one number of images and say it in their legends."""

from __future__ import annotations

import torch

import qcache.report as rp
from qcache.metrics import compare_sets


def _report(n: int, sweep_n: int) -> dict:
    return {"setup": {"steps": 8}, "n": n, "schedule": {"full_steps": [0, 1, 4]},
            "compressed": {"nfc": 3, "fid_to_fp": None, "psnr": 1.0},
            "vc": {"mode": "auto", "enabled": False, "heldout_samples": 4, "min": 0.9, "max": 1.1},
            "recipe": {"vc": {"samples": 6}},
            "error_per_step": {"without_vc": [0.1] * 8, "with_vc": [0.2] * 8, "heldout_without_vc": [0.1] * 8,
                               "heldout_with_vc": [0.3] * 8},
            "quality_vs_nfc": [{"nfc": 8, "psnr": 30.0, "fid_to_fp": None, "n": sweep_n},
                               {"nfc": 3, "psnr": 20.0, "fid_to_fp": None, "n": sweep_n}]}


def test_the_artifact_point_is_remeasured_on_the_sweeps_images(monkeypatch):
    seen = {}

    def capture(points, chosen, chosen_n=None, vc=None):
        seen.update(points=points, chosen=chosen, chosen_n=chosen_n, vc=vc)
        return b""

    monkeypatch.setattr(rp, "plot_quality_vs_nfc", capture)
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(10, 3, 16, 16, generator=g) * 2 - 1
    comp = (ref + 0.1 * torch.randn(10, 3, 16, 16, generator=g)).clamp(-1, 1)
    files = rp.plots(_report(10, 4), ref, comp)
    assert seen["chosen_n"] == 4 and seen["vc"] is False
    assert seen["chosen"]["psnr"] == compare_sets(ref[:4], comp[:4])["psnr"] != compare_sets(ref, comp)["psnr"]
    assert files["plots/error_per_step.png"][:4] == b"\x89PNG"
    rp.plots(_report(4, 4), ref[:4], comp[:4])  # same n: the table's figures as they are
    assert seen["chosen"]["psnr"] == 1.0 and seen["chosen_n"] == 4


def test_legends_name_n_and_a_dropped_vc(monkeypatch):
    labels = []
    real = rp._figure

    def spy(*a, **k):
        fig, ax = real(*a, **k)
        orig = ax.plot
        ax.plot = lambda *pa, label=None, **pk: (labels.append(label), orig(*pa, label=label, **pk))[1]
        return fig, ax

    monkeypatch.setattr(rp, "_figure", spy)
    r = _report(10, 4)
    rp.plot_quality_vs_nfc(r["quality_vs_nfc"], r["compressed"], 4, False)
    rp.plot_error_per_step(r["error_per_step"], [0, 1], {**r["vc"], "samples": 6})
    assert labels == ["quantized + cache (no VC), n=4", "this artifact, no VC, n=4",
                      "quantized + cache, fitting batch, n=6", "+ VC (not kept), fitting batch, n=6",
                      "quantized + cache, held-out batch, n=4", "+ VC (not kept), held-out batch, n=4"]
