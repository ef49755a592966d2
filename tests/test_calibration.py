"""Calibration: the pool keeps full steps only, selectors (size, time coverage, determinism), storage, CLIs."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import yaml

from calibration.pool import collect_pool
from calibration.select import METHODS, covered_bins, select
from calibration.selectors import proportional_quota, select_tap
from calibration.storage import load_dataset, save_dataset
from qcache.errors import QcacheError
from qcache.recipe import RecipeError, SamplingConfig, recipe_from_dict
from qcache.sampling import Sampler, SamplerHook
from tests.conftest import SCHEDULER_CONFIG, run_module, tiny_dit


class EveryOtherStepFull(SamplerHook):
    """Stands in for a cache: marks odd steps as cached (set in after_model, like the cache engine)."""

    def after_model(self, state):
        state.extras["full_step"] = state.index % 2 == 0


def tiny_sampler(steps: int = 6) -> Sampler:
    return Sampler(tiny_dit(), SCHEDULER_CONFIG, SamplingConfig(steps=steps, batch_size=3))


def test_pool_records_model_inputs_of_every_step_without_cache():
    s = tiny_sampler()
    pool = collect_pool(s, 5, seed=3, labels=torch.tensor([0, 1, 2, 3, 4]))
    assert len(pool) == 5 * 6 and s.hooks == []
    assert set(pool.column_names) >= {"x", "timestep", "step_index", "num_steps", "class_label", "sample_id"}
    row = pool.with_format("numpy")[:]
    assert row["x"].shape == (30, 1, 8, 8)
    assert sorted(set(row["step_index"].tolist())) == list(range(6))
    assert sorted(set(row["sample_id"].tolist())) == [0, 1, 2, 3, 4]
    # the first step's x is the initial noise of each image
    first = row["x"][row["step_index"] == 0]
    noise = torch.randn((5, 1, 8, 8), generator=torch.Generator().manual_seed(3)).numpy()
    np.testing.assert_array_equal(first[np.argsort(row["sample_id"][row["step_index"] == 0])], noise)
    assert set(row["class_label"][row["sample_id"] == 4].tolist()) == {4}


def test_pool_keeps_only_full_steps_of_a_cache():
    s = tiny_sampler()
    s.hooks.append(EveryOtherStepFull())
    pool = collect_pool(s, 4, seed=0)
    steps = pool.with_format("numpy")[:]["step_index"]
    assert len(pool) == 4 * 3 and sorted(set(steps.tolist())) == [0, 2, 4]


def synthetic_pool(n_images: int = 40, steps: int = 50, seed: int = 0, keep_every: int = 1):
    """A pool shaped like the digits model's: x (1, 8, 8), DDIM timesteps of a 50-step schedule."""
    from datasets import Array3D, Dataset, Features, Value

    rng = np.random.default_rng(seed)
    ts = np.linspace(999, 0, steps).round().astype(np.int64)[::keep_every]
    k = len(ts)
    base = rng.standard_normal((n_images, 1, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((n_images, k, 1, 8, 8)).astype(np.float32)
    frac = (ts / 999.0)[None, :, None, None, None]
    x = (np.sqrt(1 - frac) * base[:, None] + np.sqrt(frac) * noise).reshape(-1, 1, 8, 8)
    feats = Features({"x": Array3D((1, 8, 8), "float32"), "timestep": Value("int64"), "step_index": Value("int64"),
                      "class_label": Value("int64"), "sample_id": Value("int64")})
    return Dataset.from_dict({"x": x, "timestep": np.tile(ts, n_images), "step_index": np.tile(np.arange(k), n_images),
                              "class_label": np.repeat(np.arange(n_images) % 10, k),
                              "sample_id": np.repeat(np.arange(n_images), k)}, features=feats)


@pytest.mark.parametrize("method", METHODS)
def test_selectors_size_coverage_determinism(method):
    pool = synthetic_pool(n_images=24, keep_every=3)  # 17 distinct timesteps, 408 rows
    for size in (12, 64):
        a = select(pool, method, size, seed=0, clusters=20)
        b = select(pool, method, size, seed=0, clusters=20)
        assert len(a) == size
        assert len(set(a["pool_index"])) == size
        assert a["pool_index"] == b["pool_index"]  # deterministic under a seed
        cov, bins = covered_bins(pool, a)
        assert cov == bins == 10
        got = a.with_format("numpy")[:]
        src = pool.with_format("numpy")[:]
        np.testing.assert_array_equal(got["x"], src["x"][got["pool_index"]])
    assert select(pool, method, 64, seed=1, clusters=20)["pool_index"] != a["pool_index"]
    assert len(select(pool, method, 10_000, seed=0)) == len(pool)  # budget above the pool: everything


def test_random_selector_is_uniform_over_timesteps():
    pool = synthetic_pool(n_images=30, keep_every=5)  # 10 timesteps
    sel = select(pool, "random", 50, seed=0)
    counts = np.bincount(np.asarray(sel["step_index"]))
    assert counts.tolist() == [5] * 10


def test_proportional_quota():
    assert proportional_quota(np.array([10, 30, 60]), 10).tolist() == [1, 3, 6]
    q = proportional_quota(np.array([1, 1, 50]), 20)
    assert q.sum() == 20 and (q <= [1, 1, 50]).all()


def test_bad_selector_and_calibration_keys():
    pool = synthetic_pool(n_images=4)
    with pytest.raises(QcacheError, match="calibration.selector: must be one of random, kmeans, tap, got 'dbscan'"):
        select(pool, "dbscan", 8)
    for data, msg in [({"selector": "dbscan"}, "calibration.selector: must be one of"),
                      ({"size": 0}, "calibration.size: must be >= 1, got 0"),
                      ({"alpha": 1.5}, "calibration.alpha: must be <= 1.0, got 1.5"),
                      ({"sigma": 0}, "calibration.sigma: must be > 0.0, got 0")]:
        with pytest.raises(RecipeError) as e:
            recipe_from_dict({"model": {}, "calibration": data})
        assert str(e.value).startswith(msg), str(e.value)


def test_tap_selection_is_fast_on_a_big_pool():
    """20 000 rows of the digits pool's shape (64 features, 50 timesteps): the acceptance bound of 60 s."""
    rng = np.random.default_rng(0)
    f = rng.standard_normal((20_000, 64)).astype(np.float32)
    t = np.tile(np.linspace(999, 0, 50).round().astype(np.int64), 400)
    t0 = time.perf_counter()
    idx = select_tap(f, t, 256, seed=0)
    assert time.perf_counter() - t0 < 60
    assert len(np.unique(idx)) == 256


def test_storage_roundtrip_and_missing(tmp_path):
    pool = synthetic_pool(n_images=3)
    save_dataset(pool, tmp_path / "p")
    save_dataset(pool, tmp_path / "p")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    back = load_dataset(tmp_path / "p")
    assert back["timestep"][:5] == pool["timestep"][:5] and len(back) == len(pool)
    with pytest.raises(QcacheError, match="calibration.pool_path: no saved dataset at"):
        load_dataset(tmp_path / "nope")


def test_cli_collect_then_select(tmp_path, tiny_model_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"source": str(tiny_model_dir)}, "sampling": {"steps": 5, "batch_size": 4},
        "calibration": {"pool_images": 6, "size": 12, "clusters": 6, "pool_path": str(tmp_path / "pool"),
                        "selection_path": str(tmp_path / "sel")}}))
    p = run_module("calibration.collect", str(recipe), "--no-progress")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("pool: 30 rows from 6 images (5.0 full steps of 5, no cache) in ")
    p = run_module("calibration.select", str(recipe))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("selection: tap picked 12 of 30 pool rows (")
    assert len(load_dataset(tmp_path / "sel")) == 12
    import sys

    from calibration.select import main

    sys_argv = sys.argv
    sys.argv = ["calibration.select", str(recipe), "--pool", str(tmp_path / "missing")]
    try:
        with pytest.raises(QcacheError, match="^--pool: no saved dataset at"):
            main()
    finally:
        sys.argv = sys_argv
