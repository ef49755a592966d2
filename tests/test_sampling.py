"""The sampler: determinism, scheduler and CFG shapes, guidance arithmetic, hook points."""

from __future__ import annotations

import pytest
import torch

from qcache.recipe import SamplingConfig
from qcache.sampling import Sampler, SamplerHook, make_noise
from tests.conftest import SCHEDULER_CONFIG, tiny_dit


def make_sampler(**kw) -> Sampler:
    model_kw = {k: kw.pop(k) for k in ("out_channels",) if k in kw}
    cfg = SamplingConfig(**{"steps": 6, "batch_size": 4, **kw})
    return Sampler(tiny_dit(**model_kw), SCHEDULER_CONFIG, cfg)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpmsolver++"])
def test_same_seed_is_bit_identical_and_other_seed_differs(scheduler):
    s = make_sampler(scheduler=scheduler)
    a = s.sample(6, seed=3, progress=False)
    b = s.sample(6, seed=3, progress=False)
    c = s.sample(6, seed=4, progress=False)
    assert a.images.shape == (6, 1, 8, 8)
    assert torch.isfinite(a.images).all()
    assert torch.equal(a.images, b.images)
    assert not torch.allclose(a.images, c.images)
    assert a.labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_cfg_doubles_the_model_batch_only_when_enabled():
    seen = []
    for scale, expected in ((1.5, 8), (1.0, 4)):
        s = make_sampler(guidance_scale=scale)
        h = s.transformer.register_forward_hook(lambda m, a, kw, out: seen.append(kw["class_labels"].clone()),
                                                with_kwargs=True)
        s.sample(4, progress=False)
        h.remove()
        assert len(seen) == 6 and all(len(y) == expected for y in seen)
        if scale > 1:
            assert (seen[0][4:] == 10).all() and seen[0][:4].tolist() == [0, 1, 2, 3]  # null class = 10
        seen.clear()


def test_guidance_arithmetic_and_learned_sigma_channels():
    s = make_sampler(guidance_scale=3.0, out_channels=2)  # learned-sigma style output: eps + variance channels
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor(500)
    y = torch.tensor([1, 7])
    eps = s.predict_noise(x, t, y)
    assert eps.shape == (2, 1, 8, 8)
    out = s.transformer(torch.cat([x, x]), timestep=t.expand(4), class_labels=torch.tensor([1, 7, 10, 10])).sample
    cond, uncond = out[:, :1].chunk(2)
    torch.testing.assert_close(eps, uncond + 3.0 * (cond - uncond))


class Recorder(SamplerHook):
    def __init__(self):
        self.events = []

    def on_start(self, st):
        self.events.append("start")

    def before_model(self, st):
        assert st.model_output is None
        self.events.append(("before", st.index))

    def after_model(self, st):
        assert st.model_output.shape == st.latents.shape
        self.events.append(("after_model", st.index))

    def after_step(self, st):
        self.events.append(("after_step", st.index))

    def on_end(self, st):
        self.events.append("end")


def test_hooks_are_called_in_order_every_step():
    s = make_sampler(steps=3)
    rec = Recorder()
    s.hooks.append(rec)
    s.sample(2, progress=False)
    expected = ["start"] + [e for i in range(3) for e in (("before", i), ("after_model", i), ("after_step", i))] + ["end"]
    assert rec.events == expected


def test_after_step_can_replace_latents():
    class Zero(SamplerHook):
        def after_step(self, st):
            return torch.zeros_like(st.latents)

    s = make_sampler(steps=3)
    s.hooks.append(Zero())
    assert torch.equal(s.sample(2, progress=False).images, torch.zeros(2, 1, 8, 8))


def test_batching_covers_all_samples_and_noise_is_seeded():
    s = make_sampler(batch_size=3)
    out = s.sample(7, progress=False)
    assert out.images.shape == (7, 1, 8, 8) and out.labels.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert torch.equal(make_noise(5, (1, 8, 8), 9), make_noise(5, (1, 8, 8), 9))


def test_extra_hooks_are_removed_even_when_sampling_fails():
    class Boom(SamplerHook):
        def before_model(self, st):
            raise RuntimeError("boom")

    s = make_sampler(steps=2)
    own = Recorder()
    s.hooks.append(own)
    with pytest.raises(RuntimeError, match="boom"):
        with s.extra_hooks(Boom()):
            assert len(s.hooks) == 2
            s.sample(2, progress=False)
    assert s.hooks == [own]
