"""tools/ablation.py's calibration grid: mean and std over seeds per selector x pool x observer, and its table."""

from __future__ import annotations

import math

import pytest

import tools  # noqa: F401 - makes ``common`` importable
from tools.ablation import PRESETS, summary_table, sweep_summary


def test_sweep_summary_means_and_stds_over_seeds():
    rows = [{"selector": "tap", "pool": "rfc", "observer": "absmax", "seed": s, "fid_to_fp": f, "psnr": p}
            for s, f, p in ((0, 1.0, 30.0), (1, 3.0, 32.0))]
    rows += [{"selector": "random", "pool": "uncached", "observer": "percentile", "seed": 0, "error": "boom"},
             {"selector": "random", "pool": "uncached", "observer": "percentile", "seed": 1, "fid_to_fp": 2.0,
              "psnr": 31.0}]
    s = sweep_summary(rows)
    assert [e["config"] for e in s] == ["random/uncached/percentile", "tap/rfc/absmax"]  # grid order, no empty cells
    tap = s[1]
    assert tap["seeds"] == 2 and tap["fid_to_fp_mean"] == 2.0 and tap["fid_to_fp_std"] == 1.0
    assert math.isclose(tap["psnr_mean"], 31.0) and s[0]["seeds"] == 1 and s[0]["fid_to_fp_std"] == 0.0
    table = summary_table(s)
    assert "| tap | rfc | absmax | 2 | 2.000 ± 1.000 | 31.00 ± 1.00 |" in table.splitlines()
    assert PRESETS == ("W8A8", "W4A8")


def test_bad_seed_count_is_a_one_line_error(monkeypatch, capsys):
    import sys

    import tools.ablation as ab

    monkeypatch.setattr(sys, "argv", ["ablation.py", "--seeds", "0"])
    with pytest.raises(SystemExit) as e:
        ab.run_cli(ab.main)
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: --seeds: must be >= 1, got 0"
