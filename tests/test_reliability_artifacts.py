"""Tampered artifacts are refused in one line naming the file and field (issue 15 items 2, 3, 7, 8).

One small artifact is written once per module with the real writer (a tiny DiT, quanto W8, a fora schedule, VC
factors) and copied per case; each case damages the copy the way an attacker who also rewrites the manifest's
checksums would, then loads it through ``qcache.load`` and through ``python -m qcache.generate`` in process.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qcache
from qcache.artifact import MANIFEST, sha256_file, write_artifact
from qcache.cache.schedule import StaticSchedule, schedule_params
from qcache.cli import run_cli
from qcache.compressed import CompressedModel
from qcache.errors import QcacheError
from qcache.quant import quantize_transformer
from qcache.recipe import recipe_from_dict
from tests.conftest import SCHEDULER_CONFIG, tiny_dit

STEPS = 6


def _recipe(model_dir: Path, out: Path):
    return recipe_from_dict({
        "model": {"source": str(model_dir), "device": "cpu"},
        "sampling": {"steps": STEPS, "batch_size": 8, "seed": 0},
        "cache": {"policy": "fora", "interval": 2},
        "quant": {"preset": "W8"},
        "vc": {"enabled": True, "samples": 2},  # forced: the VC file is tampered with below
        "output": {"dir": str(out)},
    })


def _write(root: Path, name: str) -> tuple[Path, CompressedModel]:
    from diffusers import DDPMScheduler

    model_dir = root / "tiny-dit"
    if not model_dir.exists():
        tiny_dit().save_pretrained(model_dir / "transformer", safe_serialization=True)
        DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(model_dir / "scheduler")
    recipe = _recipe(model_dir, root / "out")
    q = quantize_transformer(tiny_dit(), recipe.quant)
    schedule = StaticSchedule("ddim", STEPS, (0, 2, 4), "fora", schedule_params(recipe.cache))
    factors = (1.0 + 0.2 * torch.rand(STEPS, 1, generator=torch.Generator().manual_seed(0))).float()
    sched_cfg = dict(DDPMScheduler(**SCHEDULER_CONFIG).config)
    cm = CompressedModel(q, sched_cfg, recipe.sampling, recipe.cache, schedule, factors, source=str(model_dir))
    art = write_artifact(root / name, cm, recipe, {"report.json": b"{}\n"})
    return art, cm


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    root = tmp_path_factory.mktemp("reliability-art")
    art, cm = _write(root, "art")
    return art, cm.generate(2, seed=0).images


# ---- tampering helpers: edit a file, then make the manifest agree (the attacker rewrites checksums) ------------
def manifest(art: Path) -> dict:
    return json.loads((art / MANIFEST).read_text())


def put_manifest(art: Path, m) -> None:
    (art / MANIFEST).write_text(json.dumps(m))


def rehash(art: Path, *rels: str) -> None:
    m = manifest(art)
    for rel in rels:
        m["files"][rel] = sha256_file(art / rel)
    put_manifest(art, m)


def edit_json(rel: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(art: Path) -> None:
        d = json.loads((art / rel).read_text())
        new = change(d)
        (art / rel).write_text(json.dumps(d if new is None else new))
        rehash(art, rel)
    return damage


def edit_text(rel: str, change: Callable[[str], str | bytes]) -> Callable[[Path], None]:
    def damage(art: Path) -> None:
        new = change((art / rel).read_text())
        (art / rel).write_bytes(new if isinstance(new, bytes) else new.encode())
        rehash(art, rel)
    return damage


def replace_bytes(rel: str, data: bytes) -> Callable[[Path], None]:
    def damage(art: Path) -> None:
        (art / rel).write_bytes(data)
        rehash(art, rel)
    return damage


def edit_vc(change: Callable[[torch.Tensor], dict]) -> Callable[[Path], None]:
    def damage(art: Path) -> None:
        f = load_file(str(art / "vc_factors.safetensors"))["factors"]
        save_file(change(f), str(art / "vc_factors.safetensors"))
        rehash(art, "vc_factors.safetensors")
    return damage


def unlist(rel: str, alter: bool = False) -> Callable[[Path], None]:
    def damage(art: Path) -> None:
        m = manifest(art)
        del m["files"][rel]
        put_manifest(art, m)
        if alter:
            p = art / rel
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0x01
            p.write_bytes(bytes(data))
    return damage


def list_extra(rel: str, digest_of: str | None = None) -> Callable[[Path], None]:
    def damage(art: Path) -> None:
        m = manifest(art)
        m["files"][rel] = sha256_file(Path(digest_of)) if digest_of else "0" * 64
        put_manifest(art, m)
    return damage


def symlink_out(rel: str) -> Callable[[Path], None]:
    """Move a listed file (or directory) outside the artifact and leave a symlink to it (checksums still match)."""
    def damage(art: Path) -> None:
        outside = art.parent / f"outside-{rel.replace('/', '-')}"
        shutil.move(str(art / rel), outside)
        os.symlink(outside, art / rel)
    return damage


def edit_manifest(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(art: Path) -> None:
        m = manifest(art)
        change(m)
        put_manifest(art, m)
    return damage


def raw_manifest(data: bytes) -> Callable[[Path], None]:
    return lambda art: (art / MANIFEST).write_bytes(data)


def _set(d: dict, path: str, value) -> None:
    *head, last = path.split(".")
    for k in head:
        d = d[k]
    d[last] = value


def _first_module(qm: dict) -> dict:
    return qm["modules"][next(iter(qm["modules"]))]


W, Q, S, V, R, C = ("transformer/model.safetensors", "transformer/quant_map.json", "cache_schedule.json",
                    "vc_factors.safetensors", "recipe.yaml", "scheduler_config.json")

CASES: list[tuple[str, Callable[[Path], None], str]] = [
    # item 2: the file set follows from the components; listed paths stay inside the artifact
    ("unlisted-weights-altered", unlist(W, alter=True), r"transformer/model.safetensors is not listed"),
    ("unlisted-quant-map", unlist(Q), r"transformer/quant_map.json is not listed"),
    ("unlisted-schedule", unlist(S), r"cache_schedule.json is not listed"),
    ("unlisted-vc", unlist(V), r"vc_factors.safetensors is not listed"),
    ("unlisted-recipe", unlist(R), r"recipe.yaml is not listed"),
    ("unlisted-scheduler-config", unlist(C), r"scheduler_config.json is not listed"),
    ("dotdot-path", list_extra("../../../../etc/passwd", "/etc/passwd"), r"holds '\.\.'"),
    ("absolute-path", list_extra("/etc/passwd", "/etc/passwd"), r"listed path '/etc/passwd' is absolute"),
    ("empty-component", list_extra("transformer//model.safetensors"), r"holds '\.\.', '\.' or an empty"),
    ("dot-component", list_extra("./recipe.yaml"), r"holds '\.\.', '\.' or an empty"),
    ("backslash", list_extra("..\\recipe.yaml"), r"backslash"),
    ("lists-the-manifest", list_extra(MANIFEST), r"is the manifest itself"),
    ("lists-a-directory", list_extra("transformer"), r"transformer is not a regular file"),
    ("symlinked-vc", symlink_out(V), r"vc_factors.safetensors is a symbolic link"),
    ("symlinked-transformer-dir", symlink_out("transformer"), r"transformer is a symbolic link"),
    ("manifest-is-a-list", raw_manifest(b"[1, 2]"), r"manifest.json: must be a JSON object, got list"),
    ("manifest-is-a-string", raw_manifest(b'"files"'), r"must be a JSON object, got str"),
    ("manifest-not-utf8", raw_manifest(b'{"format": "\xff"}'), r"manifest.json is not valid JSON"),
    ("manifest-deep", raw_manifest(b"[" * 100000), r"manifest.json is not valid JSON"),
    ("manifest-no-components", edit_manifest(lambda m: m.pop("components")), r"components: missing .*re-run"),
    ("components-cache-bogus", edit_manifest(lambda m: _set(m, "components.cache", "sometimes")),
     r"components.cache: must be one of"),
    ("components-vc-string", edit_manifest(lambda m: _set(m, "components.vc", "yes")),
     r"components.vc: must be true or false"),
    ("components-vc-off", edit_manifest(lambda m: _set(m, "components.vc", 0)), r"components.vc: must be true"),
    ("files-not-a-mapping", edit_manifest(lambda m: _set(m, "files", ["recipe.yaml"])), r"no file list"),
    ("digest-not-hex", edit_manifest(lambda m: m["files"].__setitem__(R, "abc")), r"must be a sha256"),
    ("symlinked-manifest", symlink_out(MANIFEST), r"manifest.json is not a regular file"),
    # item 3: values are checked on load (checksums updated)
    ("vc-nan", edit_vc(lambda f: {"factors": f.index_fill(0, torch.tensor([1]), float("nan"))}),
     r"vc_factors.safetensors: factors: must be finite"),
    ("vc-inf", edit_vc(lambda f: {"factors": f.index_fill(0, torch.tensor([0]), float("inf"))}),
     r"factors: must be finite"),
    ("vc-too-few-steps", edit_vc(lambda f: {"factors": f[:-1].contiguous()}),
     r"factors: must have shape \(steps, channels\) = \(6, 1\), got \(5, 1\)"),
    ("vc-wrong-channels", edit_vc(lambda f: {"factors": f.repeat(1, 3).contiguous()}), r"got \(6, 3\)"),
    ("vc-1d", edit_vc(lambda f: {"factors": f[:, 0].contiguous()}), r"got \(6,\)"),
    ("vc-out-of-clamp", edit_vc(lambda f: {"factors": f * 3}), r"must lie in the recipe's clamp range \[0.5, 1.5\]"),
    ("vc-float64", edit_vc(lambda f: {"factors": f.double()}), r"factors: must be a float32 tensor"),
    ("vc-extra-tensor", edit_vc(lambda f: {"factors": f, "other": f.clone()}), r"exactly one tensor 'factors'"),
    ("vc-not-safetensors", replace_bytes(V, b"garbage"), r"cannot read .*vc_factors.safetensors"),
    ("schedule-bool-step", edit_json(S, lambda d: _set(d, "full_steps", [0, True])),
     r"cache_schedule.json: full_steps: must be a list of integer step indices"),
    ("schedule-unsorted", edit_json(S, lambda d: _set(d, "full_steps", [0, 4, 2])), r"must be sorted and unique"),
    ("schedule-duplicate", edit_json(S, lambda d: _set(d, "full_steps", [0, 2, 2])), r"must be sorted and unique"),
    ("schedule-no-step-0", edit_json(S, lambda d: _set(d, "full_steps", [2, 4])), r"must contain step 0"),
    ("schedule-step-out-of-range", edit_json(S, lambda d: _set(d, "full_steps", [0, 6])), r"in \[0, 6\)"),
    ("schedule-float-step", edit_json(S, lambda d: _set(d, "full_steps", [0, 2.0])), r"integer step indices"),
    ("schedule-steps-mismatch", edit_json(S, lambda d: _set(d, "steps", 7)),
     r"made for ddim with 7 steps, but the recipe samples ddim with 6 steps"),
    ("schedule-policy-mismatch", edit_json(S, lambda d: _set(d, "policy", "taylorseer")),
     r"policy 'taylorseer' does not match the manifest's components.cache 'fora'"),
    ("schedule-unknown-store-dtype", edit_json(S, lambda d: _set(d, "params.store_dtype", "float64")),
     r"params.store_dtype: must be one of"),
    ("schedule-interval-string", edit_json(S, lambda d: _set(d, "params.interval", "2")),
     r"params.interval: must be an integer"),
    ("schedule-tau-nan", edit_text(S, lambda t: t.replace('"tau": null', '"tau": NaN')),
     r"params.tau: must be a finite number"),
    ("schedule-unknown-param", edit_json(S, lambda d: _set(d, "params.evil", 1)), r"params.evil: unknown parameter"),
    ("schedule-is-a-list", edit_json(S, lambda d: [d]), r"not a qcache cache schedule"),
    ("quant-map-bogus-dtype", edit_json(Q, lambda d: _set(d, "dtype", "float128")), r"quant_map.json: dtype: must"),
    ("quant-map-bogus-class", edit_json(Q, lambda d: _set(d, "model_class", "UNet2DConditionModel")),
     r"model_class: must be one of"),
    ("quant-map-bogus-weights", edit_json(Q, lambda d: _set(_first_module(d), "weights", "int3")),
     r"\.weights: must be one of int8, int4, none"),
    ("quant-map-bogus-keep-dtype", edit_json(Q, lambda d: _set(d, "keep_dtype", "float64")), r"keep_dtype: must"),
    ("quant-map-is-a-list", edit_json(Q, lambda d: [d]), r"quant_map.json: must be a JSON object, got list"),
    ("quant-map-bad-module-name", edit_json(Q, lambda d: _set(d, "modules", {"a..b": {"weights": "int8",
                                                                                      "activations": "none"}})),
     r"module names must be dotted attribute paths"),
    ("scheduler-bogus-beta-schedule", edit_json(C, lambda d: _set(d, "beta_schedule", "bogus")),
     r"scheduler_config.json: not accepted by diffusers"),
    ("scheduler-config-list", edit_json(C, lambda d: [d]), r"scheduler_config.json: must be a JSON object"),
    ("scheduler-config-not-json", edit_text(C, lambda t: "{nope"), r"scheduler_config.json is not valid JSON"),
    # item 7 in a rewritten recipe, and other recipe damage
    ("recipe-tau-inf-with-target", edit_text(R, lambda t: t.replace("tau: null", "tau: .inf\n  target_nfc: 3")),
     r"recipe.yaml is not a valid recipe: cache.tau: must be a finite number"),
    ("recipe-alias-bomb", edit_text(R, lambda t: t + "x: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"x{i}: &a{i} [{', '.join([f'*a{i - 1}' if i > 1 else '*a'] * 10)}]\n" for i in range(1, 7))),
     r"aliases expand to more than"),
    ("recipe-not-utf8", edit_text(R, lambda t: t.encode() + b"\xff\xfe"), r"recipe.yaml is not UTF-8"),
    ("recipe-steps-changed", edit_text(R, lambda t: t.replace(f"steps: {STEPS}", "steps: 7")),
     r"components: made for ddim with 6 steps, but .*recipe.yaml samples ddim with 7"),
]


def _load_error(art: Path) -> str:
    with pytest.raises(QcacheError) as e:
        qcache.load(art, device="cpu")
    return str(e.value)


def _generate_cli(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    from qcache.generate import main

    monkeypatch.setattr(sys, "argv", ["python -m qcache.generate", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(main)
    return e.value.code, capsys.readouterr().err


def one_error_line(code: int, err: str) -> str:
    """The single ``error:`` line ending stderr of a refused command (exit 2, no traceback)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert len(errors[0]) <= 1010
    return errors[0]


@pytest.mark.parametrize("name, damage, message", CASES, ids=[c[0] for c in CASES])
def test_tampered_artifact_is_refused_in_one_line(built, tmp_path: Path, monkeypatch, capsys, name, damage, message):
    art, _ = built
    copy = tmp_path / "art"
    shutil.copytree(art, copy, symlinks=True)
    damage(copy)
    import re

    assert re.search(message, _load_error(copy)), _load_error(copy)
    png = tmp_path / "grid.png"
    line = one_error_line(*_generate_cli(monkeypatch, capsys, str(copy), "--n", "2", "--out", str(png)))
    assert re.search(message, line), line
    assert not png.exists()


def test_table_is_big_enough():
    assert len(CASES) >= 30


def test_pristine_copy_loads_and_generates_the_same_images(built, tmp_path: Path, monkeypatch, capsys):
    art, expected = built
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    (copy / "unlisted.json").write_text("not json at all")  # extra unlisted files are never read
    (copy / "transformer" / "extra.safetensors").write_bytes(b"junk")
    model = qcache.load(copy, device="cpu")
    assert model.nfc == 3 and model.vc_factors.shape == (STEPS, 1)
    assert torch.equal(model.generate(2, seed=0).images, expected)
    png = tmp_path / "g.png"
    code, err = _generate_cli(monkeypatch, capsys, str(copy), "--n", "2", "--out", str(png))
    assert code == 0 and png.stat().st_size > 0, err


def test_artifact_files_get_umask_permissions(tmp_path: Path):
    old = os.umask(0o027)
    try:
        art, _ = _write(tmp_path, "art")
    finally:
        os.umask(old)
    modes = {p.relative_to(art).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [art, *art.rglob("*")]}
    assert modes.pop(".") == 0o750 and modes.pop("transformer") == 0o750
    assert modes and set(modes.values()) == {0o640}, modes


def test_strict_json_writer_turns_non_finite_into_null(tmp_path: Path):
    from qcache.cli import json_bytes, write_json

    write_json(tmp_path / "r.json", {"tau": float("inf"), "xs": [1.0, float("nan")], "t": (1, 2)})
    text = (tmp_path / "r.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"tau": None, "xs": [1.0, None], "t": [1, 2]}
    assert json.loads(json_bytes({"p": tmp_path}, default=str)) == {"p": str(tmp_path)}
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_schedule_steps_mismatch_message_names_both_step_counts(built):
    art, _ = built
    model = qcache.load(art, device="cpu")
    with pytest.raises(QcacheError, match=r"built for ddim with 6 steps \(its cache schedule\), got ddim with 5 steps"):
        model.generate(1, steps=5)
