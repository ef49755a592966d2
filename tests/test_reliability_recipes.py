"""Malformed input to every command line gives one ``error:`` line, exit code 2, and writes nothing (issue 15).

Each case writes a recipe (or a damaged model directory, or a blocked output path) under a fresh temporary
directory, runs the command's ``main`` in process through ``run_cli`` (as ``python -m ...`` does), and checks the
exit code, that stderr ends in exactly one ``error:`` line matching the expected text, and that no file or
directory appeared anywhere under the temporary directory (which is also the working directory).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from qcache.cli import MAX_SEED, run_cli
from tests.conftest import SCHEDULER_CONFIG, tiny_dit

MODULES = {"compress": "qcache.compress", "evaluate": "qcache.evaluate", "collect": "calibration.collect",
           "select": "calibration.select", "generate": "qcache.generate"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from diffusers import DDPMScheduler

    d = tmp_path_factory.mktemp("rel-model") / "tiny-dit"
    tiny_dit().save_pretrained(d / "transformer", safe_serialization=True)
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(d / "scheduler")
    return d


def base_recipe(model: Path, tmp: Path) -> dict:
    return {
        "model": {"source": str(model), "device": "cpu"},
        "sampling": {"steps": 4, "batch_size": 4},
        "eval": {"n": 4, "latency_repeats": 1, "latency_samples": 2},
        "output": {"dir": str(tmp / "out")},
        "cache": {"policy": "none"},
        "calibration": {"pool_images": 2, "size": 4, "clusters": 2, "pool_path": str(tmp / "pool"),
                        "selection_path": str(tmp / "sel")},
        "quant": {"preset": "W8"},
        "vc": {"samples": 2},
    }


class Ctx:
    """What a case may refer to: the temporary directory and the module's tiny model."""

    def __init__(self, tmp: Path, model: Path) -> None:
        self.tmp, self.model = tmp, model

    def file(self, name: str = "plain-file") -> Path:
        p = self.tmp / name
        p.write_text("a regular file\n")
        return p


Recipe = Callable[[Ctx], Any]  # -> dict (dumped as YAML), str or bytes (written as is), or a Path (used as is)


def over(**sections: dict) -> Recipe:
    """The base recipe with ``sections`` merged in (a value that is a callable gets the context)."""
    def make(c: Ctx) -> dict:
        r = base_recipe(c.model, c.tmp)
        for name, values in sections.items():
            values = values(c) if callable(values) else values
            r[name] = {**r.get(name, {}), **values} if isinstance(values, dict) else values
        return r
    return make


def text(t: str | bytes) -> Recipe:
    return lambda c: t


def bad_model(transformer_config: bytes | None = None, scheduler: dict | None = None) -> Recipe:
    """The base recipe on a copy of the tiny model with a replaced config.json or scheduler config."""
    def make(c: Ctx) -> dict:
        d = c.tmp / "model-copy"
        shutil.copytree(c.model, d)
        if transformer_config is not None:
            (d / "transformer" / "config.json").write_bytes(transformer_config)
        if scheduler is not None:
            p = d / "scheduler" / "scheduler_config.json"
            p.write_text(json.dumps({**json.loads(p.read_text()), **scheduler}))
        return base_recipe(d, c.tmp)
    return make


def with_schedule(schedule: str | bytes) -> Recipe:
    def make(c: Ctx) -> dict:
        p = c.tmp / "schedule.json"
        p.write_bytes(schedule if isinstance(schedule, bytes) else schedule.encode())
        return over(cache={"policy": "fora", "schedule": str(p)})(c)
    return make


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{k}: &{k} [{', '.join(['*' + p] * 9)}]\n" for p, k in zip("abcdefgh", "bcdefghi"))
GOOD_SCHEDULE = {"format": "qcache.cache_schedule", "version": 1, "sampler": "ddim", "steps": 4, "nfc": 2,
                 "full_steps": [0, 2], "policy": "fora", "params": {"interval": 2}}


def deep_list(depth: int) -> str:
    return "[" * depth + "]" * depth


# (id, command, recipe, extra argv ({tmp}: the temporary directory), expected error text (regex))
CASES: list[tuple[str, str, Recipe | None, list[str], str]] = [
    # reading the recipe file
    ("non-utf8", "compress", text(b"model:\n  source: \xff\xfe\n"), [], r"recipe: .* is not UTF-8 text"),
    ("non-utf8-evaluate", "evaluate", text(b"\xc3\x28: 1\n"), [], r"is not UTF-8 text"),
    ("non-utf8-collect", "collect", text(b"model: {source: \x80}\n"), [], r"is not UTF-8 text"),
    ("non-utf8-select", "select", text(b"\xfe\xff"), [], r"is not UTF-8 text"),
    ("nested-lists", "compress", text("x: " + "[" * 20000), [], r"recipe: .*nested too deeply"),
    ("nested-maps", "evaluate", text("{a: " * 20000), [], r"nested too deeply"),
    ("nested-lists-collect", "collect", text("[" * 20000), [], r"nested too deeply"),
    ("alias-bomb", "compress", text(ALIAS_BOMB), [], r"aliases expand to more than 100000 values"),
    ("alias-bomb-evaluate", "evaluate", text(ALIAS_BOMB), [], r"aliases expand"),
    ("alias-bomb-collect", "collect", text(ALIAS_BOMB), [], r"aliases expand"),
    ("alias-bomb-select", "select", text(ALIAS_BOMB), [], r"aliases expand"),
    ("recursive-alias", "compress", text("model: &m {source: *m}\n"), [], r"recursive YAML"),
    ("invalid-yaml", "compress", text("model: [unclosed\n"), [], r"recipe: invalid YAML in .* at line"),
    ("tab-indent", "compress", text("model:\n\tsource: x\n"), [], r"invalid YAML"),
    ("python-tag", "compress", text("model: !!python/object/apply:os.system ['touch pwned']\n"), [],
     r"invalid YAML"),
    ("nul-char", "compress", text("model: {source: a\x00b}\n"), [], r"invalid YAML"),
    ("top-level-list", "compress", text("- 1\n- 2\n"), [], r"recipe: must be a mapping of sections"),
    ("top-level-scalar", "evaluate", text("42\n"), [], r"recipe: must be a mapping of sections, got 42"),
    ("empty-file", "compress", text(""), [], r"recipe: must be a mapping of sections, got None"),
    ("non-string-section", "compress", text("1: {}\nmodel: {}\n"), [], r"section names must be strings"),
    ("recipe-is-a-directory", "compress", lambda c: c.tmp, [], r"recipe: .* is a directory, expected a YAML file"),
    ("recipe-missing", "evaluate", lambda c: c.tmp / "nope.yaml", [], r"recipe: file not found"),
    ("huge-value", "compress", over(model={"dtype": "x" * 100000}), [], r"model.dtype: must be one of"),
    ("deep-value", "compress", text("model: {}\nsampling: {steps: " + deep_list(100) + "}\n"), [],
     r"sampling.steps: must be an integer"),
    # values
    ("seed-2^63", "compress", over(sampling={"seed": 2**63}), [], rf"sampling.seed: must be <= {MAX_SEED}"),
    ("seed-2^64", "evaluate", over(sampling={"seed": 2**64}), [], r"sampling.seed: must be <="),
    ("seed-2e13", "collect", over(sampling={"seed": 20000000000000}), [], r"sampling.seed: must be <="),
    ("seed-negative", "compress", over(sampling={"seed": -1}), [], r"sampling.seed: must be >= 0"),
    ("seed-float", "compress", over(sampling={"seed": 1.5}), [], r"sampling.seed: must be an integer"),
    ("seed-bool", "compress", over(sampling={"seed": True}), [], r"sampling.seed: must be an integer"),
    ("pool-seed-2^63", "compress", over(calibration={"pool_seed": 2**63}), [], r"calibration.pool_seed: must be <="),
    ("pool-seed-collect", "collect", over(calibration={"pool_seed": 2**63}), [], r"calibration.pool_seed"),
    ("selector-seed-2^63", "select", over(calibration={"seed": 2**63}), [], r"calibration.seed: must be <="),
    ("tune-seed-2^63", "compress", over(cache={"tune_seed": 2**63}), [], r"cache.tune_seed: must be <="),
    ("vc-seed-2^63", "compress", over(vc={"seed": 2**63}), [], r"vc.seed: must be <="),
    ("vc-seed-negative", "compress", over(vc={"seed": -5}), [], r"vc.seed: must be >= 0"),
    ("eval-n-1", "compress", over(eval={"n": 1}), [], r"eval.n: must be >= 2, got 1"),
    ("eval-n-1-evaluate", "evaluate", over(eval={"n": 1}), [], r"eval.n: must be >= 2"),
    ("tau-inf-with-target", "compress", over(cache={"policy": "rfc", "tau": float("inf"), "target_nfc": 3}), [],
     r"cache.tau: must be a finite number, got inf"),
    ("tau-nan", "compress", over(cache={"policy": "rfc", "tau": float("nan")}), [], r"cache.tau: must be a finite"),
    ("tau-negative", "compress", over(cache={"policy": "rfc", "tau": -1.0}), [], r"cache.tau: must be >= 0"),
    ("tau-and-target", "compress", over(cache={"policy": "rfc", "tau": 0.1, "target_nfc": 3}), [],
     r"cache.tau: give tau or target_nfc, not both"),
    ("rfc-without-tau", "compress", over(cache={"policy": "rfc"}), [], r"cache.target_nfc: rfc with rcs needs"),
    ("target-over-steps", "compress", over(cache={"policy": "rfc", "target_nfc": 9}), [],
     r"cache.target_nfc: must be <= sampling.steps"),
    ("target-under-warmup", "compress", over(cache={"policy": "rfc", "target_nfc": 1}), [],
     r"cache.target_nfc: must be >= warmup"),
    ("guidance-nan", "compress", over(sampling={"guidance_scale": float("nan")}), [],
     r"sampling.guidance_scale: must be a finite number"),
    ("guidance-inf", "evaluate", over(sampling={"guidance_scale": float("inf")}), [], r"must be a finite number"),
    ("steps-zero", "compress", over(sampling={"steps": 0}), [], r"sampling.steps: must be >= 1"),
    ("steps-bool", "compress", over(sampling={"steps": True}), [], r"sampling.steps: must be an integer"),
    ("steps-string", "compress", over(sampling={"steps": "10"}), [], r"sampling.steps: must be an integer"),
    ("batch-size-huge", "compress", over(sampling={"batch_size": 2**40}), [], r"sampling.batch_size: must be <="),
    ("scheduler-bogus", "compress", over(sampling={"scheduler": "euler"}), [], r"sampling.scheduler: must be one"),
    ("dtype-bogus", "compress", over(model={"dtype": "float64"}), [], r"model.dtype: must be one of"),
    ("device-bogus", "evaluate", over(model={"device": "tpu"}), [], r"model.device: must be auto, cpu"),
    ("source-empty", "compress", over(model={"source": ""}), [], r"model.source: must be a non-empty string"),
    ("source-nul", "compress", over(model={"source": "a\x00b"}), [], r"model.source: must not contain a NUL"),
    ("source-missing-dir", "compress", over(model={"source": "./no-such-model"}), [],
     r"model.source: directory not found"),
    ("source-huge", "evaluate", over(model={"source": "./" + "m" * 100000}), [], r"model.source: "),
    ("unknown-section", "compress", over(evaluation={"n": 3}), [], r"evaluation: unknown section"),
    ("unknown-key", "compress", over(sampling={"stepz": 3}), [], r"sampling.stepz: unknown key"),
    ("model-missing", "compress", text("sampling: {steps: 4}\n"), [], r"model: required section is missing"),
    ("selector-bogus", "select", over(calibration={"selector": "best"}), [], r"calibration.selector: must be one"),
    ("alpha-2", "compress", over(calibration={"alpha": 2}), [], r"calibration.alpha: must be <= 1.0"),
    ("sigma-zero", "compress", over(calibration={"sigma": 0}), [], r"calibration.sigma: must be > 0.0"),
    ("sigma-inf", "select", over(calibration={"sigma": float("inf")}), [], r"calibration.sigma: must be a finite"),
    ("preset-bogus", "compress", over(quant={"preset": "W2"}), [], r"quant.preset: must be one of"),
    ("torchao-w4", "compress", over(quant={"preset": "W4", "backend": "torchao"}), [],
     r"quant.preset: backend torchao supports"),
    ("override-without-pattern", "compress", over(quant={"overrides": [{"weights": "int8"}]}), [],
     r"quant.overrides\[0\].pattern: required key is missing"),
    ("exclude-not-a-list", "compress", over(quant={"exclude": "proj_out"}), [], r"quant.exclude: must be a list"),
    ("clamp-min-2", "compress", over(vc={"clamp_min": 2.0}), [], r"vc.clamp_min: must be <= 1.0, got 2.0"),
    ("clamp-max-inf", "compress", over(vc={"clamp_max": float("inf")}), [], r"vc.clamp_max: must be a finite"),
    ("vc-samples-1", "compress", over(vc={"samples": 1}), [], r"vc.samples: must be >= 2"),
    ("class-negative", "compress", over(condition={"classes": [-1]}), [], r"condition.classes\[0\]: must be >= 0"),
    ("class-bool", "compress", over(condition={"classes": [True]}), [], r"condition.classes\[0\]: must be an integer"),
    ("output-dir-empty", "compress", over(output={"dir": ""}), [], r"output.dir: must be a non-empty string"),
    # output paths, named by where they came from, checked before any work
    ("output-dir-under-file", "compress", over(output=lambda c: {"dir": str(c.file() / "out")}), [],
     r"output.dir: .*plain-file is not a directory"),
    ("output-dir-is-file", "compress", over(output=lambda c: {"dir": str(c.file())}), [],
     r"output.dir: .*plain-file exists and is not a directory"),
    ("output-dir-in-proc", "compress", over(output={"dir": "/proc/qcache-test/out"}), [],
     r"output.dir: cannot write under /proc"),
    ("output-dir-long-name", "compress", over(output=lambda c: {"dir": str(c.tmp / ("d" * 300))}), [],
     r"output.dir: a path component is longer than 255 bytes"),
    ("output-dir-5000", "compress", over(output=lambda c: {"dir": str(c.tmp / ("d" * 5000))}), [],
     r"output.dir: path is longer than 4096 bytes"),
    ("out-flag-under-file", "compress", over(), ["--out", "{tmp}/plain-file/out"], r"^error: --out: "),
    ("compress-n-1", "compress", over(), ["--n", "1"], r"--n: must be >= 2"),
    ("evaluate-json-under-file", "evaluate", over(), ["--json", "{tmp}/plain-file/m.json"],
     r"--json: .*plain-file is not a directory"),
    ("evaluate-json-is-dir", "evaluate", over(), ["--json", "{tmp}"], r"--json: .* is a directory"),
    ("evaluate-samples-under-file", "evaluate", over(), ["--samples", "{tmp}/plain-file/s.safetensors"],
     r"--samples: "),
    ("evaluate-n-1", "evaluate", over(), ["--n", "1"], r"--n: must be >= 2 \(FID needs two samples\), got 1"),
    ("collect-out-under-file", "collect", over(), ["--out", "{tmp}/plain-file/pool"],
     r"--out: .*plain-file is not a directory"),
    ("collect-pool-path-under-file", "collect", over(calibration=lambda c: {"pool_path": str(c.file() / "p")}), [],
     r"calibration.pool_path: .*plain-file is not a directory"),
    ("collect-images-0", "collect", over(), ["--images", "0"], r"--images: must be in \[1, "),
    ("collect-seed-2^63", "collect", over(), ["--seed", str(2**63)], r"--seed: must be in \[0, "),
    ("select-out-under-file", "select", over(), ["--out", "{tmp}/plain-file/sel"], r"--out: "),
    ("select-selection-path-under-file", "select",
     over(calibration=lambda c: {"selection_path": str(c.file() / "s")}), [], r"calibration.selection_path: "),
    ("select-seed-negative", "select", over(), ["--seed", "-1"], r"--seed: must be in \[0, "),
    ("select-size-0", "select", over(), ["--size", "0"], r"--size: must be in \[1, "),
    # the model directory and files the recipe refers to
    ("model-config-list", "compress", bad_model(transformer_config=b"[]"), [],
     r"model.source: .*config.json must hold a JSON object, got list"),
    ("model-config-list-evaluate", "evaluate", bad_model(transformer_config=b"[]"), [], r"got list"),
    ("model-config-list-collect", "collect", bad_model(transformer_config=b"[]"), [], r"got list"),
    ("model-config-not-utf8", "compress", bad_model(transformer_config=b"{\"\xff\": 1}"), [],
     r"model.source: cannot read .*config.json"),
    ("model-config-deep", "compress", bad_model(transformer_config=b"[" * 100000), [], r"model.source: cannot read"),
    ("scheduler-beta-bogus", "compress", bad_model(scheduler={"beta_schedule": "bogus"}), [],
     r"model.source: .*scheduler_config.json: not accepted by diffusers DDPMScheduler"),
    ("scheduler-beta-bogus-evaluate", "evaluate", bad_model(scheduler={"beta_schedule": "bogus"}), [],
     r"not accepted by diffusers"),
    ("scheduler-beta-bogus-collect", "collect", bad_model(scheduler={"beta_schedule": "bogus"}), [],
     r"not accepted by diffusers"),
    ("scheduler-class-bogus", "compress", bad_model(scheduler={"_class_name": "os.system"}), [],
     r"_class_name: not a diffusers scheduler"),
    ("schedule-bool-step", "collect", with_schedule(json.dumps({**GOOD_SCHEDULE, "full_steps": [0, True]})), [],
     r"cache.schedule .*full_steps: must be a list of integer step indices"),
    ("schedule-not-utf8", "collect", with_schedule(b"\xff\xfe"), [], r"cache.schedule: cannot read"),
    ("schedule-unsorted", "collect", with_schedule(json.dumps({**GOOD_SCHEDULE, "full_steps": [0, 3, 2],
                                                               "nfc": 3})), [], r"must be sorted and unique"),
    # generate: its own flags, checked before the artifact is even opened
    ("generate-seed-2e13", "generate", None, ["{tmp}/art", "--seed", "20000000000000", "--out", "{tmp}/g.png"],
     r"--seed: must be in \[0, 8796093022207\], got 20000000000000"),
    ("generate-seed-negative", "generate", None, ["{tmp}/art", "--seed", "-1", "--out", "{tmp}/g.png"],
     r"--seed: must be in"),
    ("generate-n-0", "generate", None, ["{tmp}/art", "--n", "0", "--out", "{tmp}/g.png"], r"--n: must be in"),
    ("generate-out-not-png", "generate", None, ["{tmp}/art", "--out", "{tmp}/g.jpg"], r"--out: must be a .png"),
    ("generate-out-under-file", "generate", None, ["{tmp}/art", "--out", "{tmp}/plain-file/g.png"],
     r"--out: .*plain-file is not a directory"),
    ("generate-samples-under-file", "generate", None,
     ["{tmp}/art", "--out", "{tmp}/g.png", "--samples", "{tmp}/plain-file/s.safetensors"], r"--samples: "),
    ("generate-device-bogus", "generate", None, ["{tmp}/art", "--out", "{tmp}/g.png", "--device", "tpu"],
     r"--device: must be auto, cpu"),
    ("generate-missing-artifact", "generate", None, ["{tmp}/art", "--out", "{tmp}/g.png"],
     r"artifact: directory not found"),
]


def _tree(root: Path) -> dict[str, int | None]:
    """Every path under ``root`` with its file's mtime (directories: None; the output-path check creates and
    removes a probe file, which touches a directory's mtime but leaves nothing behind)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.lstat().st_mtime_ns for p in root.rglob("*")}


def run_main(command: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run ``python -m <command> argv`` in process; (exit code, stderr)."""
    mod = importlib.import_module(MODULES[command])
    monkeypatch.setattr(sys, "argv", [MODULES[command], *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(mod.main)
    return e.value.code, capsys.readouterr().err


def one_error_line(code: int, err: str) -> str:
    """The single ``error:`` line ending stderr (exit 2, no traceback, at most ~1000 characters)."""
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-2000:]
    assert len(errors[0]) <= 1010, len(errors[0])
    return errors[0]


@pytest.mark.parametrize("name, command, recipe, argv, message", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_line_exit_2_and_writes_nothing(model_dir: Path, tmp_path: Path, monkeypatch,
                                                                capsys, name, command, recipe, argv, message):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative defaults (runs/digits) would land here
    ctx = Ctx(work, model_dir)
    ctx.file()
    args = [a.replace("{tmp}", str(work)) for a in argv]
    if recipe is not None:
        made = recipe(ctx)
        if isinstance(made, Path):
            path = made
        else:
            path = tmp_path / "recipe.yaml"
            data = made if isinstance(made, (str, bytes)) else yaml.safe_dump(made)
            path.write_bytes(data if isinstance(data, bytes) else data.encode())
        args = [str(path), *args]
    before = _tree(tmp_path)
    line = one_error_line(*run_main(command, args, monkeypatch, capsys))
    assert re.search(message, line), line
    assert _tree(tmp_path) == before, "something was written"


def test_table_is_big_enough_and_covers_every_command():
    assert len(CASES) >= 60
    assert {c[1] for c in CASES} == set(MODULES)


def test_error_values_are_shortened():
    from qcache.cli import short

    assert len(short("x" * 10**6)) <= 200
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    assert len(short(nested)) <= 200
    shared = ["x"] * 9
    for _ in range(12):  # an alias-bomb-like structure: 9**12 leaves, a few hundred objects
        shared = [shared] * 9
    assert len(short(shared)) <= 200


def test_recipe_tau_zero_and_a_good_schedule_still_load(tmp_path: Path):
    from qcache.cache.schedule import StaticSchedule
    from qcache.recipe import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text("model: {}\ncache: {policy: rfc, tau: 0}\nsampling: {seed: 8796093022207}\n")
    r = load_recipe(p)
    assert r.cache.tau == 0.0 and r.sampling.seed == 2**43 - 1
    s = StaticSchedule.from_dict(dict(GOOD_SCHEDULE))
    assert s.full_steps == (0, 2) and s.nfc == 2


def test_output_path_check_creates_nothing(tmp_path: Path):
    from qcache.cli import check_output_path

    target = tmp_path / "a" / "b" / "c.json"
    assert check_output_path(target, "--json") == target
    assert list(tmp_path.iterdir()) == []
    if os.geteuid() != 0:  # root writes anywhere; the probe file is what catches read-only places then
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(Exception, match="--json: cannot write under"):
            check_output_path(ro / "x.json", "--json")
