"""Recipe validation: every error path gives one line naming the key path and the bad value, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qcache.recipe import RecipeError, load_recipe, recipe_from_dict, recipe_to_dict
from tests.conftest import REPO, cli_error, run_module

GOOD = {"model": {"source": "builtin:digits"}, "sampling": {"steps": 10}}


def test_default_recipe_loads_with_expected_values():
    r = load_recipe(REPO / "recipes" / "digits.yaml")
    assert r.model.source == "builtin:digits"
    assert r.sampling.steps == 50 and r.sampling.scheduler == "ddim"
    assert r.sampling.guidance_scale == 1.5
    assert recipe_to_dict(r)["sampling"]["steps"] == 50
    assert (r.cache.policy, r.cache.target_nfc, r.cache.tau, r.cache.rfe, r.cache.rcs) == ("rfc", 14, None, True, True)
    assert (r.quant.preset, r.quant.observer, r.quant.overrides) == ("W8A8", "absmax", ())
    assert (r.calibration.selector, r.calibration.size, r.calibration.cache_aware) == ("tap", 256, True)
    assert (r.vc.enabled, r.vc.samples, r.vc.clamp_min, r.vc.clamp_max) == ("auto", 64, 0.5, 1.5)


def test_cache_section_defaults_and_values():
    assert recipe_from_dict({"model": {}}).cache.policy == "none"
    c = recipe_from_dict({"model": {}, "cache": {"policy": "taylorseer", "interval": 5, "order": 1}}).cache
    assert (c.policy, c.interval, c.order, c.warmup, c.store_dtype) == ("taylorseer", 5, 1, 2, "model")
    assert recipe_from_dict({"model": {}, "cache": {"policy": "rfc", "tau": 0}}).cache.tau == 0.0


def test_schedule_is_chosen_on_the_fp_model_unless_the_recipe_says_compressed():
    from qcache.pipeline import schedule_model

    fp, quantized = object(), object()
    r = recipe_from_dict({"model": {}, "cache": {"policy": "rfc", "target_nfc": 10}})
    assert r.cache.schedule_on == "fp" and schedule_model(r, fp, quantized) is fp
    r = recipe_from_dict({"model": {}, "cache": {"policy": "rfc", "target_nfc": 10, "schedule_on": "compressed"}})
    assert schedule_model(r, fp, quantized) is quantized


def test_defaults_fill_missing_sections():
    r = recipe_from_dict({"model": {}})
    assert r.model.source == "builtin:digits" and r.sampling.steps == 50 and r.eval.n == 500


def test_int_accepted_for_float_field():
    assert recipe_from_dict({"model": {}, "sampling": {"guidance_scale": 2}}).sampling.guidance_scale == 2.0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {}, "sampling": {"steps": 0}}, "sampling.steps: must be >= 1, got 0"),
        ({"model": {}, "sampling": {"steps": "ten"}}, "sampling.steps: must be an integer, got 'ten'"),
        ({"model": {}, "sampling": {"steps": 2.5}}, "sampling.steps: must be an integer, got 2.5"),
        ({"model": {}, "sampling": {"steps": True}}, "sampling.steps: must be an integer, got True"),
        ({"model": {}, "sampling": {"guidance_scale": 0.5}}, "sampling.guidance_scale: must be >= 1.0, got 0.5"),
        ({"model": {}, "sampling": {"scheduler": "euler"}}, "sampling.scheduler: must be one of 'ddim', 'ddpm', 'dpmsolver++', 'flow-euler', got 'euler'"),
        ({"model": {}, "sampling": {"stepz": 3}}, "sampling.stepz: unknown key"),
        ({"model": {}, "sampling": [1, 2]}, "sampling: must be a mapping, got [1, 2]"),
        ({"model": {"source": ""}}, "model.source: must be a non-empty string, got ''"),
        ({"model": {"dtype": "int8"}}, "model.dtype: must be one of"),
        ({"model": {"device": "tpu"}}, "model.device: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ({"model": {}, "eval": {"n": -1}}, "eval.n: must be >= 2, got -1"),
        ({"model": {}, "banana": {}}, "banana: unknown section"),
        ({"model": {}, "cache": {"policy": "lru"}}, "cache.policy: must be one of 'none', 'fora', 'taylorseer', 'rfc', got 'lru'"),
        ({"model": {}, "cache": {"interval": 0}}, "cache.interval: must be >= 1, got 0"),
        ({"model": {}, "cache": {"order": 5}}, "cache.order: must be <= 4, got 5"),
        ({"model": {}, "cache": {"tau": -0.1}}, "cache.tau: must be >= 0.0, got -0.1"),
        ({"model": {}, "cache": {"rfe": "yes"}}, "cache.rfe: must be true or false, got 'yes'"),
        ({"model": {}, "cache": {"store_dtype": "int8"}}, "cache.store_dtype: must be one of"),
        ({"model": {}, "cache": {"schedule_on": "quantized"}},
         "cache.schedule_on: must be one of 'fp', 'compressed', got 'quantized'"),
        ({"model": {}, "cache": {"policy": "rfc"}}, "cache.target_nfc: rfc with rcs needs tau or target_nfc"),
        ({"model": {}, "cache": {"target_nfc": 1, "warmup": 3}}, "cache.target_nfc: must be >= warmup (3), got 1"),
        ({"model": {}, "cache": {"target_nfc": 60}}, "cache.target_nfc: must be <= sampling.steps (50), got 60"),
        ({"sampling": {}}, "model: required section is missing"),
        ([1, 2], "recipe: must be a mapping of sections"),
    ],
)
def test_bad_values_name_key_and_value(data, message):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(data)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_section_is_refused():
    with pytest.raises(RecipeError, match=r"^vcc: unknown section \(known: .*vc"):
        recipe_from_dict({"model": {}, "vcc": {}})


def test_vc_section():
    r = recipe_from_dict({"model": {}, "vc": {"samples": 16, "clamp_min": 0.8, "clamp_max": 1.2}})
    assert (r.vc.enabled, r.vc.samples, r.vc.clamp_min, r.vc.clamp_max) == ("auto", 16, 0.8, 1.2)
    for vc, msg in (({"clamp_min": 1.2}, "vc.clamp_min: must be <= 1.0, got 1.2"),
                    ({"clamp_max": 0.9}, "vc.clamp_max: must be >= 1.0, got 0.9"),
                    ({"clamp_min": 0.0}, "vc.clamp_min: must be > 0.0, got 0.0"),
                    ({"samples": 1}, "vc.samples: must be >= 2, got 1"),
                    ({"enabled": 1}, "vc.enabled: must be true, false or 'auto', got 1")):
        with pytest.raises(RecipeError) as e:
            recipe_from_dict({"model": {}, "vc": vc})
        assert str(e.value) == msg


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(RecipeError, match="recipe: file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  source: [unclosed\n")
    with pytest.raises(RecipeError, match=r"recipe: invalid YAML in .*bad.yaml at line \d+"):
        load_recipe(bad)


def test_cli_reports_one_line_exit_2_and_writes_nothing(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {}, "sampling": {"steps": 0}}))
    out = tmp_path / "out.json"
    p = run_module("qcache.evaluate", str(recipe), "--json", str(out))
    assert p.returncode == 2
    assert cli_error(p) == "error: sampling.steps: must be >= 1, got 0"
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [recipe]
