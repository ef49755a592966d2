"""tools/bench_cache.py's cache-dit rows: the latency comparison (pure), cache-dit attached to qcache's sampler and
taken off exactly, and the bench end to end with and without cache-dit installed."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import tools.bench_cache as bc
import tools.cachedit_rows as cdr


def _row(method, ratio, psnr, fid=None, **extra):
    return {"method": method, "latency_ratio": ratio, "psnr": psnr, "fid_to_fp": fid, **extra}


def test_interpolate_is_linear_and_null_outside():
    pts = [(1.5, 40.0), (2.5, 30.0), (3.5, 20.0)]
    assert cdr.interpolate(pts, 2.0) == pytest.approx(35.0)
    assert cdr.interpolate(pts, 3.5) == pytest.approx(20.0)
    assert cdr.interpolate(pts, 1.4) is None and cdr.interpolate(pts, 3.6) is None
    assert cdr.interpolate([(2.0, 7.0)], 2.0) == 7.0 and cdr.interpolate([(2.0, 7.0)], 2.5) is None
    assert cdr.interpolate([], 2.0) is None


def test_latency_comparison_hand_made_rows():
    rows = [
        _row("FP", 1.0, 99.0, 0.0),
        # RFC: psnr 40 -> 30 between ratio 1.5 and 3.5 (unsorted on purpose); FID 0.1 -> 0.5
        _row("RFC", 3.5, 30.0, 0.5, target_nfc=10), _row("RFC", 1.5, 40.0, 0.1, target_nfc=25),
        _row("FORA", 2.0, 33.0, 0.3, target_nfc=17), _row("FORA", 2.6, 31.0, 0.4, target_nfc=14),
        _row("cache-dit DBCache", 2.0, 34.0, 0.2, threshold=0.08), _row("cache-dit DBCache", 3.0, 28.0, 0.6,
                                                                        threshold=0.2),
        _row("cache-dit DBCache+TaylorSeer", 2.2, 36.0, 0.25, threshold=0.08),
        _row("cache-dit DBCache+TaylorSeer", 2.8, 30.0, 0.45, threshold=0.2),
        {"method": "RFC", "target_nfc": 8, "error": "QcacheError: x"},  # failed rows are left out
        {"method": "TaylorSeer", "target_nfc": 8, "psnr": 50.0, "fid_to_fp": 0.01},  # no latency: left out
    ]
    out = cdr.latency_comparison(rows)
    assert set(out) == {"2", "2.5", "3"}
    a = out["2"]
    assert a["methods"]["RFC"]["psnr"] == pytest.approx(37.5)
    assert a["methods"]["FORA"]["psnr"] == pytest.approx(33.0)
    assert a["methods"]["cache-dit DBCache"]["psnr"] == pytest.approx(34.0)
    assert a["methods"]["cache-dit DBCache+TaylorSeer"]["psnr"] is None  # 2.0 < 2.2: outside its curve
    assert "TaylorSeer" not in a["methods"] and "FP" not in a["methods"]
    assert a["qcache_best_psnr"] == pytest.approx(37.5) and a["qcache_best_psnr_method"] == "RFC"
    assert a["cachedit_best_psnr"] == pytest.approx(34.0)
    assert a["psnr_margin_db"] == pytest.approx(3.5)
    assert a["qcache_best_fid_to_fp"] == pytest.approx(0.2) and a["qcache_best_fid_to_fp_method"] == "RFC"
    assert a["cachedit_best_fid_to_fp"] == pytest.approx(0.2)
    assert a["fid_to_fp_margin"] == pytest.approx(0.0)
    b = out["2.5"]  # RFC 35.0; FORA 31.33; DBCache 31.0; +TaylorSeer 33.0
    assert b["qcache_best_psnr"] == pytest.approx(35.0)
    assert b["cachedit_best_psnr"] == pytest.approx(33.0) and b["cachedit_best_psnr_method"] == \
        "cache-dit DBCache+TaylorSeer"
    assert b["psnr_margin_db"] == pytest.approx(2.0)
    assert b["methods"]["FORA"]["psnr"] == pytest.approx(31.0 + 2.0 * 0.1 / 0.6)
    c = out["3"]  # FORA ends at 2.6; +TaylorSeer at 2.8
    assert c["methods"]["FORA"]["psnr"] is None and c["methods"]["cache-dit DBCache+TaylorSeer"]["psnr"] is None
    assert c["qcache_best_psnr"] == pytest.approx(32.5) and c["cachedit_best_psnr"] == pytest.approx(28.0)
    assert c["psnr_margin_db"] == pytest.approx(4.5)
    # PSNR only (rows off the digits judge): no FID keys
    psnr_only = cdr.latency_comparison([{**r, "fid_to_fp": None} for r in rows if "latency_ratio" in r])
    assert "fid_to_fp_margin" not in psnr_only["2"] and psnr_only["2"]["psnr_margin_db"] == pytest.approx(3.5)
    # no cache-dit curve reaching a ratio: null margin
    assert cdr.latency_comparison([r for r in rows if not cdr.is_cachedit(r["method"])])["2"]["psnr_margin_db"] \
        is None


def test_acceptance_has_the_cachedit_block_only_with_cachedit_rows():
    rows = [_row("FP", 1.0, 99.0, target_nfc=50), _row("RFC", 2.0, 30.0, target_nfc=14, nfc=14.0),
            _row("TaylorSeer", 2.0, 29.0, target_nfc=14, nfc=14.0)]
    assert "cachedit" not in bc.acceptance(rows)
    rows.append(_row("cache-dit DBCache", 2.0, 28.0, target_nfc=None, threshold=0.1))
    acc = bc.acceptance(rows)
    assert acc["cachedit"]["2"]["psnr_margin_db"] == pytest.approx(2.0) and "14" in acc


STEPS = 8  # of the digits model's 50: enough for warm-up, cached steps and a fresh start to show


@pytest.fixture(scope="module")
def digits():
    from tools.common import DIGITS_RECIPE, RecipeModel

    rm = RecipeModel.load(DIGITS_RECIPE, device="cpu")
    return rm, rm.sampler(steps=STEPS, batch_size=4)


def test_cachedit_attach_is_fresh_each_run_and_detach_restores_the_model(digits):
    pytest.importorskip("cache_dit")
    rm, sampler = digits
    tr = sampler.transformer
    keys, mods, blocks_keys = set(tr.__dict__), list(tr._modules), set(tr.transformer_blocks.__dict__)
    state = {k: v.clone() for k, v in tr.state_dict().items()}
    fp = sampler.sample(4, progress=False).images
    setup = cdr.CacheDitSetup(threshold=0.3, taylorseer=True, warmup=2)
    outs, nfcs = [], []
    for _ in range(2):
        with setup.attach(sampler) as cache:
            outs.append(sampler.sample(4, progress=False).images)
            assert tr._is_cached  # cache-dit's own flag while attached
        nfcs.append(cache.stats.mean_nfc())
        assert len(cache.stats.cached) == 1
        rep = cache.stats.report()
        assert 0 < rep["cached_steps"] <= STEPS - 2 and rep["nfc"] == STEPS - rep["cached_steps"]
        assert rep["block_nfc"] == pytest.approx(rep["nfc"] + rep["cached_steps"] / len(tr.transformer_blocks))
        assert min(rep["cached_step_indices"]) >= 2  # warm-up steps 0 and 1 always computed
    assert nfcs[0] == nfcs[1] < STEPS
    assert torch.equal(outs[0], outs[1])  # each run starts from a fresh cache-dit context
    assert not torch.equal(outs[0], fp)  # cached steps change the samples
    # detached: the module is as it was and FP sampling is bit-identical
    assert set(tr.__dict__) == keys and list(tr._modules) == mods and set(tr.transformer_blocks.__dict__) == blocks_keys
    assert "forward" not in tr.__dict__ and not hasattr(tr, "_is_patched") and not hasattr(tr, "_norm1_emb")
    assert list(tr.state_dict()) == list(state) and all(torch.equal(tr.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(sampler.sample(4, progress=False).images, fp)
    # a DBCache row without the calibrator caches too, and differs from the TaylorSeer row
    with cdr.CacheDitSetup(threshold=0.3, taylorseer=False, warmup=2).attach(sampler) as cache:
        db = sampler.sample(4, progress=False).images
    assert cache.stats.mean_nfc() < STEPS and not torch.equal(db, outs[0])
    assert torch.equal(sampler.sample(4, progress=False).images, fp)


def test_cachedit_failing_enable_leaves_the_model_as_it_was(digits, monkeypatch):
    cd = pytest.importorskip("cache_dit")
    tr = digits[1].transformer
    keys, mods = set(tr.__dict__), list(tr._modules)

    def fail(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(cd, "enable_cache", fail)  # after the adapter has patched the forward
    with pytest.raises(RuntimeError, match="boom"), cdr.CacheDitSetup(0.1, False, 2).attach(digits[1]):
        pass
    assert set(tr.__dict__) == keys and list(tr._modules) == mods and "forward" not in tr.__dict__


def test_cachedit_attach_without_cachedit_is_one_line_error(digits, monkeypatch):
    from qcache.errors import QcacheError

    monkeypatch.setitem(sys.modules, "cache_dit", None)  # import cache_dit now raises ImportError
    assert cdr.import_cache_dit() is None
    with pytest.raises(QcacheError, match="not installed"), cdr.CacheDitSetup(0.1, False, 2).attach(digits[1]):
        pass


BENCH = ["--n", "4", "--targets", "10", "--methods", "FORA", "--latency-samples", "2", "--repeats", "1",
         "--tune-samples", "4"]


def _bench(monkeypatch, tmp_path, *extra):
    out = tmp_path / "bc.json"
    monkeypatch.setattr(sys, "argv", ["bench_cache.py", *BENCH, "--json", str(out), *extra])
    # 12 steps instead of the recipe's 50 keeps the run to seconds; the rows are the same code path
    real = bc.RecipeModel.sampler
    monkeypatch.setattr(bc.RecipeModel, "sampler", lambda self, *a, **kw: real(self, *a, **{**kw, "steps": 12}))
    # FLOP counting (torch's FlopCounterMode) would triple the run's time; the rows' FLOPs are not checked here
    monkeypatch.setattr(bc, "executed_flops", lambda fn: (fn(), 0))
    bc.main()
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_cache_with_cachedit_rows(monkeypatch, tmp_path, capsys):
    pytest.importorskip("cache_dit")
    rep = _bench(monkeypatch, tmp_path, "--cachedit-thresholds", "0.3", "--plot", str(tmp_path / "p.png"))
    rows = {(r["method"], r.get("threshold")): r for r in rep["rows"]}
    assert rep["complete"] and rep["cachedit"]["version"] == cdr.CACHEDIT_PIN
    for name in cdr.METHODS:
        r = rows[(name, 0.3)]
        assert "error" not in r and r["psnr"] > 0 and r["latency_ratio"] > 0 and r["latency_s"] > 0
        assert r["fn_compute_blocks"] == 1 and r["bn_compute_blocks"] == 0 and r["max_warmup_steps"] == 2
        assert r["nfc"] is not None and r["nfc"] <= 12 and r["latency_nfc"] == r["nfc"]
    assert rows[("FORA", None)]["latency_ratio"] > 0 and rows[("FP", None)]["latency_ratio"] == 1.0
    assert set(rep["acceptance"]["cachedit"]) == {"2", "2.5", "3"}
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "p-latency.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "cache-dit DBCache+TaylorSeer" in out and "| threshold |" in out.replace("| method | threshold |",
                                                                                     "| threshold |")


@pytest.mark.slow
def test_bench_cache_without_cachedit_skips_its_rows(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "cache_dit", None)
    rep = _bench(monkeypatch, tmp_path, "--cachedit-thresholds", "0.1,0.2")
    assert rep["complete"] and [r["method"] for r in rep["rows"]] == ["FP", "FORA"]
    assert rep["cachedit"]["skipped"] == cdr.MISSING and "cachedit" not in rep["acceptance"]
    assert capsys.readouterr().out.count("cache-dit rows skipped") == 1


def test_bad_cachedit_flags_are_one_line_errors(monkeypatch, tmp_path):
    from qcache.errors import QcacheError

    for flags, msg in ((["--cachedit-thresholds", "0.1,x"], "--cachedit-thresholds"),
                       (["--cachedit-thresholds", "0"], "> 0"), (["--cachedit-methods", "cache-dit Foo"], "unknown")):
        monkeypatch.setattr(sys, "argv", ["bench_cache.py", "--json", str(tmp_path / "x.json"), *flags])
        with pytest.raises(QcacheError, match=msg):
            bc.main()
    assert not (tmp_path / "x.json").exists()
