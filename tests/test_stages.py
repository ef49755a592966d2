"""Declared stages: keys derived from what each stage reads, model and scheduler fingerprints that notice a changed
model, inputs checked before anything is written, stage directories with the umask's permissions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from qcache import fingerprint
from qcache.compress import STAGES, compress
from qcache.errors import QcacheError
from qcache.recipe import recipe_from_dict
from qcache.stages import Stage, StageRun, StageStore, derive_key, run_stages
from tests.conftest import REPO, cli_error, run_module

DIGITS = REPO / "qcache" / "models" / "builtin" / "digits"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
SCHEDULER = "scheduler/scheduler_config.json"
# what an artifact holds besides its report, plots and manifest (those carry timings)
MODEL_FILES = ("recipe.yaml", "scheduler_config.json", "transformer/model.safetensors",
               "transformer/quant_map.json", "cache_schedule.json", "vc_factors.safetensors")


def quiet(msg: str) -> None:
    pass


def small_recipe(model_dir: Path, out: Path, **sections) -> dict:
    """The smallest recipe that runs every stage: 4 steps, a handful of images everywhere."""
    r = {
        "model": {"source": str(model_dir), "device": "cpu"},
        "sampling": {"steps": 4, "guidance_scale": 1.5, "seed": 0, "batch_size": 16},
        "eval": {"n": 4, "latency_repeats": 1, "latency_samples": 2},
        "output": {"dir": str(out)},
        "cache": {"policy": "rfc", "target_nfc": 3, "warmup": 2, "tune_samples": 2},
        "calibration": {"pool_images": 2, "size": 4, "selector": "random"},
        "quant": {"preset": "W8A8"},
        "vc": {"enabled": True, "samples": 2},  # forced: the VC file is compared below
    }
    for k, v in sections.items():
        r[k] = {**r.get(k, {}), **v}
    return r


@pytest.fixture
def digits(tmp_path: Path, monkeypatch):
    """A private copy of the builtin digits model and a private file-hash cache; one torch thread (these models are
    far too small to gain from more, and a shared machine loses much to oversubscription)."""
    monkeypatch.setenv(fingerprint.CACHE_ENV, str(tmp_path / "hash-cache"))
    d = tmp_path / "digits"
    shutil.copytree(DIGITS, d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield d
    torch.set_num_threads(threads)


def reused(res) -> dict[str, bool]:
    return {k: v["reused"] for k, v in res.report["stages"].items()}


def model_files(artifact: Path) -> dict[str, str]:
    return {f: hashlib.sha256((artifact / f).read_bytes()).hexdigest() for f in MODEL_FILES
            if (artifact / f).exists()}


def scale_one_tensor(model_dir: Path, factor: float = 1.01) -> None:
    from safetensors.torch import load_file, save_file

    path = model_dir / WEIGHTS
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if k.endswith("weight") and tensors[k].dim() == 2)
    tensors[name] = tensors[name] * factor
    save_file(tensors, str(path), metadata={"format": "pt"})


def set_scheduler(model_dir: Path, **values) -> None:
    path = model_dir / SCHEDULER
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}, indent=2))


# ---- end to end: a changed model recomputes what reads it -----------------------------------------------------
@pytest.mark.slow
def test_changed_weights_recompute_every_stage_and_equal_a_fresh_run(digits: Path, tmp_path: Path):
    out = tmp_path / "out"
    recipe = recipe_from_dict(small_recipe(digits, out))
    first = compress(recipe, out, progress=False, log=quiet)
    assert all(not r for r in reused(first).values()) and list(reused(first)) == list(STAGES)
    before = model_files(first.artifact)  # the next runs replace this artifact
    assert all(reused(compress(recipe, out, progress=False, log=quiet)).values())  # unchanged: every stage reused

    scale_one_tensor(digits)
    changed = compress(recipe, out, progress=False, log=quiet)
    assert not any(reused(changed).values())  # every stage reads the weights, itself or through its upstream
    files = model_files(changed.artifact)
    assert files["transformer/model.safetensors"] != before["transformer/model.safetensors"]
    fresh = compress(recipe, out, progress=False, fresh=True, log=quiet)
    assert not any(reused(fresh).values()) and model_files(fresh.artifact) == files


@pytest.mark.slow
def test_changed_scheduler_config_recomputes_exactly_what_samples(digits: Path, tmp_path: Path):
    out = tmp_path / "out"
    recipe = recipe_from_dict(small_recipe(digits, out, quant={"preset": "W8"}, cache={"policy": "fora", "interval": 2},
                                           vc={"enabled": False}))
    before = model_files(compress(recipe, out, progress=False, log=quiet).artifact)
    set_scheduler(digits, beta_end=0.021)
    res = compress(recipe, out, progress=False, log=quiet)
    # no pool here (no activation is calibrated): quantizing reads the weights, not the noise schedule
    assert reused(res) == {"quantize": True, "schedule": False, "vc": False, "reference": False, "evaluate": False,
                           "sweep": False}
    assert json.loads((res.artifact / "scheduler_config.json").read_text())["beta_end"] == 0.021
    assert model_files(res.artifact)["transformer/model.safetensors"] == before["transformer/model.safetensors"]
    fresh = compress(recipe, out, progress=False, fresh=True, log=quiet)
    assert model_files(fresh.artifact) == model_files(res.artifact)
    assert fresh.report["full_precision"]["fid_data"] == res.report["full_precision"]["fid_data"]
    scale_one_tensor(digits)
    assert not any(reused(compress(recipe, out, progress=False, log=quiet)).values())


# ---- fingerprints ----------------------------------------------------------------------------------------------
def test_directory_fingerprint_follows_content_and_hashes_each_file_once(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(fingerprint.CACHE_ENV, str(tmp_path / "cache"))
    d = tmp_path / "m"
    shutil.copytree(DIGITS, d)
    calls: list[Path] = []
    real = fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda p: calls.append(p) or real(p))
    fp = fingerprint.directory_fingerprint(d)
    assert sorted(c.relative_to(d).as_posix() for c in calls) == ["training.json", "transformer/config.json", WEIGHTS]
    calls.clear()
    assert fingerprint.directory_fingerprint(d) == fp and calls == []  # the second run reads the hash cache
    cache_file = tmp_path / "cache" / fingerprint.CACHE_FILE
    assert len(json.loads(cache_file.read_text())) == 3

    set_scheduler(d, beta_end=0.03)  # the scheduler enters keys as the loaded config, not as a file
    (d / "transformer" / ".notes").write_text("hidden files are not part of the model")
    assert fingerprint.directory_fingerprint(d) == fp and calls == []
    scale_one_tensor(d)
    assert fingerprint.directory_fingerprint(d) != fp and [c.name for c in calls] == [Path(WEIGHTS).name]
    (d / "transformer" / "config.json").rename(d / "transformer" / "config2.json")  # a renamed file counts too
    assert fingerprint.directory_fingerprint(d) != fp


def test_hash_cache_file_gets_the_umask_permissions(tmp_path: Path):
    old = os.umask(0o022)
    try:
        cache = fingerprint.HashCache(tmp_path / "c" / "hashes.json")
        (tmp_path / "f").write_bytes(b"x")
        assert cache.sha256(tmp_path / "f") == hashlib.sha256(b"x").hexdigest()
        cache.save()
    finally:
        os.umask(old)
    assert (tmp_path / "c" / "hashes.json").stat().st_mode & 0o777 == 0o644


def test_hub_model_is_fingerprinted_by_its_snapshot_commit(tmp_path: Path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-dit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit / "transformer"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert fingerprint.model_fingerprint("someone/tiny-dit") == {"hub": "someone/tiny-dit", "revision": commit}
    assert fingerprint.model_fingerprint("someone/not-cached") == {"hub": "someone/not-cached", "revision": None}


# ---- declared stages -------------------------------------------------------------------------------------------
def _toy_stages(log: list) -> list[Stage]:
    def build(name):
        def b(run, tmp):
            log.append(("build", name))
            (tmp / "x.json").write_text(json.dumps(run.recipe_dict["a"]))
            return f"{name}-built", {"name": name}
        return b

    def load(run, path, info):
        log.append(("load", info["name"]))
        return f"{info['name']}-loaded"

    return [Stage("one", build("one"), load, lambda i: "", recipe=("a.x",), inputs=("model",)),
            Stage("two", build("two"), load, lambda i: "", recipe=("b",), after=("one",))]


def test_keys_follow_exactly_what_a_stage_declares_and_reused_products_load_lazily(tmp_path: Path):
    log: list = []
    stages = _toy_stages(log)
    store = StageStore(tmp_path / "stages")

    def run(recipe: dict, model: str = "m1") -> StageRun:
        r = StageRun(recipe_dict=recipe, inputs={"model": model})
        run_stages(stages, store, r, lambda m: None)
        return r

    base = {"a": {"x": 1, "y": 1}, "b": 1}
    r1 = run(base)
    assert r1.product("two") == "two-built" and [e[0] for e in log] == ["build", "build"]
    log.clear()
    r2 = run({**base, "a": {"x": 1, "y": 2}})  # a.y is read by nobody
    assert r2.keys == r1.keys and log == [] and r2.timings["one"]["reused"]
    assert r2.product("two") == "two-loaded" and log == [("load", "two")]  # "one" is never loaded
    log.clear()
    r3 = run({**base, "b": 2})
    assert r3.keys["one"] == r1.keys["one"] and r3.keys["two"] != r1.keys["two"] and log == [("build", "two")]
    log.clear()
    r4 = run(base, model="m2")  # an outside input: the stage reading it and everything after it
    assert log == [("build", "one"), ("build", "two")] and r4.keys["two"] != r1.keys["two"]
    assert derive_key(stages[0], r4) == r4.keys["one"]


def test_stage_directories_get_the_umask_permissions(tmp_path: Path):
    old = os.umask(0o027)
    try:
        res = StageStore(tmp_path / "stages").run("s", "k", lambda tmp: (tmp / "f").write_text("x") and None)
    finally:
        os.umask(old)
    assert res.path.stat().st_mode & 0o777 == 0o750 and (res.path / "f").stat().st_mode & 0o777 == 0o640


# ---- inputs checked before anything is written -----------------------------------------------------------------
def _schedule_file(tmp_path: Path, steps: int) -> str:
    p = tmp_path / "sched.json"
    p.write_text(json.dumps({"format": "qcache.cache_schedule", "version": 1, "sampler": "ddim", "steps": steps,
                             "full_steps": [0, 1, 3], "policy": "rfc", "params": {}}))
    return str(p)


@pytest.mark.parametrize("case,message", [
    ("bogus_beta_schedule", r"^model\.source: .*scheduler_config\.json: not accepted by diffusers .*bogus"),
    ("too_few_train_steps", r"^model\.source: .*scheduler config .*ValueError"),
    ("schedule_missing", r"^cache\.schedule: file not found"),
    ("schedule_not_json", r"^cache\.schedule: cannot read"),
    ("schedule_other_steps", r"^cache\.schedule: made for ddim with 6 steps"),
    ("out_under_a_file", r"^output\.dir: .*file is not a directory, so .*out cannot be created$"),
    ("out_is_a_file", r"^output\.dir: .* exists and is not a directory$"),
    ("out_name_too_long", r"^output\.dir: path is longer than 4096 bytes, got .*\.\.\."),
    ("out_path_too_long", r"^output\.dir: path is longer than 4096 bytes"),
    ("out_in_proc", r"^output\.dir: cannot write under /proc"),
])
def test_bad_input_is_refused_before_anything_is_written(digits: Path, tmp_path: Path, case: str, message: str):
    root = tmp_path / "work"
    root.mkdir()
    out, sections = root / "out", {}
    if case == "bogus_beta_schedule":
        set_scheduler(digits, beta_schedule="bogus")
    elif case == "too_few_train_steps":
        set_scheduler(digits, num_train_timesteps=2)
    elif case.startswith("schedule_"):
        path = {"schedule_missing": str(tmp_path / "none.json"), "schedule_other_steps": _schedule_file(tmp_path, 6),
                "schedule_not_json": str(tmp_path / "bad.json")}[case]
        (tmp_path / "bad.json").write_text("{not json")
        sections["cache"] = {"schedule": path}
    elif case in ("out_under_a_file", "out_is_a_file"):
        (root / "file").write_text("x")
        out = root / "file" / "out" if case == "out_under_a_file" else root / "file"
    elif case == "out_name_too_long":
        out = root / ("x" * 5000)
    elif case == "out_path_too_long":  # the first directories can be made, the path then fails: they are removed
        out = root.joinpath(*["d" * 200] * 25)
    elif case == "out_in_proc":
        out = Path("/proc/qcache-test/out")
    before = sorted(p.name for p in root.iterdir())
    recipe = recipe_from_dict(small_recipe(digits, out, **sections))
    with pytest.raises(QcacheError, match=message) as e:
        compress(recipe, progress=False, log=quiet)
    assert len(str(e.value)) < 300
    assert sorted(p.name for p in root.iterdir()) == before and not (root / "out").exists()


def test_out_flag_is_named_when_the_path_came_from_it(digits: Path, tmp_path: Path):
    (tmp_path / "file").write_text("x")
    recipe = recipe_from_dict(small_recipe(digits, tmp_path / "unused"))
    with pytest.raises(QcacheError, match=r"^--out: .*file is not a directory, so .*out cannot be created$"):
        compress(recipe, tmp_path / "file" / "out", progress=False, log=quiet)
    assert not (tmp_path / "unused").exists()


def test_cli_bad_scheduler_config_is_one_line_and_writes_nothing(digits: Path, tmp_path: Path):
    import yaml

    set_scheduler(digits, beta_schedule="bogus")
    out = tmp_path / "out"
    rpath = tmp_path / "r.yaml"
    rpath.write_text(yaml.safe_dump(small_recipe(digits, out)))
    line = cli_error(run_module("qcache.compress", str(rpath), "--no-progress"))
    assert line.startswith("error: model.source: ") and "scheduler" in line and not out.exists()


def test_stage_key_reads_are_real_recipe_paths():
    from qcache.compress import STAGE_LIST
    from qcache.recipe import recipe_to_dict
    from qcache.stages import recipe_value

    plain = recipe_to_dict(recipe_from_dict({"model": {}}))
    names: list[str] = []
    for st in STAGE_LIST:
        for path in st.recipe:
            recipe_value(plain, path)  # KeyError on a typo
        assert set(st.inputs) <= {"weights", "scheduler", "condition", "schedule_file"}
        assert set(st.after) <= set(names), st.name  # upstream stages come first
        names.append(st.name)
    assert tuple(names) == STAGES
