"""vc.enabled auto: factors fitted on one batch are kept only where they lower the held-out error against FP."""

from __future__ import annotations

import pytest
import torch

from qcache.compressed import CompressedModel
from qcache.pipeline import fit_variance_compensation
from qcache.recipe import CacheConfig, RecipeError, SamplingConfig, recipe_from_dict
from qcache.sampling import Sampler, SamplerHook, StepState
from qcache.vc import Batch, compensate, fit_and_validate, variance_ratio_factor
from tests.conftest import SCHEDULER_CONFIG, tiny_dit

CFG = SamplingConfig(steps=6, batch_size=8)


class Shrink(SamplerHook):
    """A deliberately variance-shrinking 'compression': every step pulls x_t towards its per-channel mean."""

    def __init__(self, k: float) -> None:
        self.k = k

    def after_step(self, state: StepState) -> torch.Tensor:
        return compensate(state.latents, torch.full((state.latents.shape[1],), self.k))


def _batch(seed: int, n: int = 8) -> Batch:
    return Batch(torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)), torch.arange(n) % 10, seed)


def test_variance_ratio_recovers_known_factors():
    x_hat = torch.randn(5, 3, 8, 8)
    k_true = torch.tensor([0.8, 1.1, 1.3])
    torch.testing.assert_close(variance_ratio_factor(x_hat, compensate(x_hat, k_true)), k_true, rtol=1e-5, atol=1e-6)
    flat = torch.ones(2, 3, 8, 8)
    assert torch.equal(variance_ratio_factor(flat, torch.randn(2, 3, 8, 8)), torch.ones(3))


@pytest.mark.parametrize("method", ["least_squares", "variance"])
def test_auto_keeps_vc_where_it_repairs_a_shrinking_cache(method):
    model = tiny_dit(seed=0)
    ref = Sampler(model, SCHEDULER_CONFIG, CFG)
    shrunk = Sampler(model, SCHEDULER_CONFIG, CFG)
    shrunk.hooks.append(Shrink(0.8))
    res = fit_and_validate(shrunk, ref, _batch(1), _batch(2), "auto", (0.5, 1.5), method)
    info = res.info
    assert info["mode"] == "auto" and info["kept"] and info["enabled"] and info["fit"] == method
    assert res.factors is not None and res.factors.shape == (6, 1)
    torch.testing.assert_close(res.factors, torch.full((6, 1), 1 / 0.8), rtol=1e-3, atol=1e-3)
    assert info["heldout_error_with"] < 0.1 * info["heldout_error_without"]
    assert info["heldout_error_without"] > 0.05  # the shrink does real damage on the held-out batch
    assert len(res.curves["heldout_with_vc"]) == 6 and shrunk.hooks[-1].__class__ is Shrink  # hooks as they were


def test_auto_drops_vc_that_does_not_help_and_false_fits_nothing():
    ref = Sampler(tiny_dit(seed=0), SCHEDULER_CONFIG, CFG)
    same = Sampler(ref.transformer, SCHEDULER_CONFIG, CFG)  # identity compression: nothing to correct
    res = fit_and_validate(same, ref, _batch(1), _batch(2), "auto")
    assert res.factors is None and not res.info["kept"] and not res.info["enabled"]
    assert res.info["heldout_error_without"] == 0.0
    assert res.info["heldout_error_with"] >= res.info["heldout_error_without"]  # never worse than off
    forced = fit_and_validate(same, ref, _batch(1), _batch(2), True)
    assert forced.factors is not None and forced.info["kept"] and forced.info["mode"] == "on"
    off = fit_and_validate(same, ref, _batch(1), None, False)
    assert off.factors is None and off.info == {"mode": "off", "fit": "least_squares", "kept": False,
                                                "enabled": False, "final_error_without": 0.0}
    with pytest.raises(ValueError, match="held-out"):
        fit_and_validate(same, ref, _batch(1), None, "auto")


def test_pipeline_auto_drops_vc_on_an_uncompressed_model():
    model = tiny_dit(seed=0)
    recipe = recipe_from_dict({"model": {"source": "builtin:digits"}, "sampling": {"steps": 6, "batch_size": 8},
                               "vc": {"samples": 4, "holdout_samples": 4}})
    assert recipe.vc.enabled == "auto"
    cm = CompressedModel(model, SCHEDULER_CONFIG, recipe.sampling, CacheConfig(), None)
    factors, curves, info = fit_variance_compensation(recipe, cm, model, SCHEDULER_CONFIG, with_info=True)
    assert factors is None and info["kept"] is False and "heldout_with_vc" in curves
    with cm.sampler() as s:  # the dropped VC leaves a model that still generates
        assert s.sample(2, progress=False).images.shape[0] == 2


@pytest.mark.parametrize("vc, msg", [
    ({"enabled": 1}, "vc.enabled: must be true, false or 'auto', got 1"),
    ({"enabled": "yes"}, "vc.enabled: must be true, false or 'auto', got 'yes'"),
    ({"holdout_seed": 2}, "vc.holdout_seed: must differ from vc.seed (the fitting batch), got 2"),
    ({"fit": "lsq"}, "vc.fit: must be one of 'least_squares', 'variance', got 'lsq'"),
    ({"holdout_samples": 1}, "vc.holdout_samples: must be >= 2, got 1"),
])
def test_bad_vc_keys_are_one_line_errors(vc, msg):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"model": {"source": "builtin:digits"}, "vc": vc})
    assert str(e.value) == msg


def test_auto_needs_more_than_min_gain():
    model = tiny_dit(seed=0)
    ref = Sampler(model, SCHEDULER_CONFIG, CFG)
    shrunk = Sampler(model, SCHEDULER_CONFIG, CFG)
    shrunk.hooks.append(Shrink(0.98))
    res = fit_and_validate(shrunk, ref, _batch(1), _batch(2), "auto", min_gain=0.0)
    gain = 1 - res.info["heldout_error_with"] / res.info["heldout_error_without"]
    assert res.info["kept"] and 0 < gain < 1
    strict = fit_and_validate(shrunk, ref, _batch(1), _batch(2), "auto", min_gain=min(1.0, gain + 1e-3))
    assert strict.factors is None and not strict.info["kept"] and strict.info["min_gain"] > gain
