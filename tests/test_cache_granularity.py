"""``cache.granularity``: module outputs, block residuals or one span residual, with the same forecasts, schedules
and accounting at each."""

from __future__ import annotations

import pytest
import torch

from qcache.cache import StaticSchedule, attach_cache, record_schedule, replay
from qcache.cache.accounting import cache_bytes_per_image
from qcache.errors import QcacheError
from qcache.recipe import CacheConfig, RecipeError, SamplingConfig, recipe_from_dict
from qcache.sampling import Sampler
from tests.conftest import SCHEDULER_CONFIG, tiny_dit

LAYERS, TOKENS, WIDTH = 4, 16, 16  # tiny_dit(layers=4): 8x8 samples, patch 2, 2 heads x 8


def sampler(steps: int = 10) -> Sampler:
    return Sampler(tiny_dit(layers=LAYERS), SCHEDULER_CONFIG, SamplingConfig(steps=steps, batch_size=4))


def sample(s: Sampler, cfg: CacheConfig | None, n: int = 2, **kw):
    if cfg is None:
        return s.sample(n, seed=0, progress=False).images, None
    with attach_cache(s.transformer, cfg, sampler=s, **kw) as cache:
        out = s.sample(n, seed=0, progress=False).images
    return out, cache


@pytest.mark.parametrize("granularity", ["module", "block", "span"])
@pytest.mark.parametrize("rcs", [False, True])
def test_measured_state_bytes_match_the_accounting_formula(granularity, rcs):
    s = sampler()
    kw = dict(tau=0.05) if rcs else dict(rcs=False, interval=3)
    _, cache = sample(s, CacheConfig(policy="rfc", granularity=granularity, **kw))
    hid = TOKENS * WIDTH
    units = {"module": 2 * LAYERS, "block": LAYERS, "span": 1}[granularity]  # DiT blocks: attn1 + ff
    want = cache_bytes_per_image([(hid, hid)] * units, "rfe", 2, 4, 4, hid if rcs else None, rows_per_image=2)
    assert cache.stats.bytes_per_image() == want
    assert len(cache._states) == units


@pytest.mark.parametrize("granularity", ["block", "span"])
def test_every_step_full_is_bit_identical_to_no_cache(granularity):
    s = sampler()
    ref, _ = sample(s, None)
    for cfg in (CacheConfig(policy="rfc", tau=0.0, granularity=granularity),
                CacheConfig(policy="taylorseer", interval=1, granularity=granularity)):
        out, cache = sample(s, cfg)
        assert cache.stats.mean_nfc() == 10
        assert torch.equal(out, ref)


@pytest.mark.parametrize("granularity", ["block", "span"])
def test_cached_steps_change_the_output_and_stay_close(granularity):
    s = sampler()
    ref, _ = sample(s, None)
    out, cache = sample(s, CacheConfig(policy="rfc", rcs=False, interval=3, granularity=granularity))
    assert cache.stats.mean_nfc() < 10
    assert not torch.equal(out, ref)
    assert (out - ref).abs().max() < 0.5 * ref.abs().max()


def test_span_skips_the_blocks_between_the_fresh_head_and_tail():
    s = sampler()
    calls = {i: 0 for i in range(LAYERS)}
    handles = [s.transformer.transformer_blocks[i].register_forward_hook(
        lambda *a, i=i: calls.__setitem__(i, calls[i] + 1)) for i in range(LAYERS)]
    try:
        _, cache = sample(s, CacheConfig(policy="fora", interval=3, granularity="span", fresh_head=1, fresh_tail=1))
    finally:
        for h in handles:
            h.remove()
    nfc = int(cache.stats.mean_nfc())
    assert nfc < 10
    assert calls[0] == calls[LAYERS - 1] == 10  # head and tail: every step
    assert calls[1] == calls[2] == 10  # hooked span blocks are called, but pass through on cached steps
    assert list(cache._states) == ["span:transformer_blocks.1..transformer_blocks.2"]


def test_span_pass_through_blocks_do_no_work():
    s = sampler()
    attn = []
    h = s.transformer.transformer_blocks[1].attn1.register_forward_hook(lambda *a: attn.append(1))
    try:
        _, cache = sample(s, CacheConfig(policy="fora", interval=3, granularity="span"))
    finally:
        h.remove()
    assert len(attn) == cache.stats.mean_nfc() < 10


def test_fresh_head_and_tail_must_leave_a_block():
    s = sampler()
    with pytest.raises(QcacheError, match=r"cache.fresh_head: fresh_head \+ fresh_tail \(2 \+ 2\) must leave"):
        attach_cache(s.transformer, CacheConfig(policy="fora", granularity="span", fresh_head=2, fresh_tail=2))
    assert getattr(s.transformer.transformer_blocks[0], "_diffusers_hook", None) is None or \
        s.transformer.transformer_blocks[0]._diffusers_hook.get_hook("qcache_feature_cache") is None


def test_recipe_keys_are_validated():
    r = recipe_from_dict({"model": {}, "cache": {"policy": "fora", "granularity": "span", "fresh_head": 2}})
    assert (r.cache.granularity, r.cache.fresh_head, r.cache.fresh_tail) == ("span", 2, 1)
    with pytest.raises(RecipeError, match=r"cache\.granularity"):
        recipe_from_dict({"model": {}, "cache": {"policy": "fora", "granularity": "layer"}})
    with pytest.raises(RecipeError, match=r"cache\.fresh_tail"):
        recipe_from_dict({"model": {}, "cache": {"policy": "fora", "fresh_tail": -1}})


@pytest.mark.parametrize("granularity", ["block", "span"])
def test_static_schedule_records_the_granularity_and_replays_bit_identically(granularity, tmp_path):
    s = sampler()
    live, cache = sample(s, CacheConfig(policy="rfc", tau=0.05, granularity=granularity))
    sched = record_schedule(cache, s, tau=0.05)
    assert sched.params["granularity"] == granularity
    sched.save(tmp_path / "s.json")
    loaded = StaticSchedule.load(tmp_path / "s.json")
    assert loaded.config().granularity == granularity
    with replay(s, loaded) as c:
        again = s.sample(2, seed=0, progress=False).images
    assert c.granularity == granularity and not s.hooks
    assert torch.equal(again, live)


def test_cache_memory_tool_writes_every_config_and_span_fits_flux(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "mem.json"
    p = subprocess.run([sys.executable, str(REPO / "tools" / "cache_memory.py"), "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["config"] for r in rows} == {"dit-xl-2-256", "pixart-alpha-512", "sd3-medium-1024", "flux-dev-1024"}
    assert len(rows) == 4 * 3 * 2 and all(set(r) >= {"config", "granularity", "store_dtype", "bytes_per_image"}
                                          for r in rows)
    b = {(r["config"], r["granularity"], r["store_dtype"]): r["bytes_per_image"] for r in rows}
    assert b[("flux-dev-1024", "span", "bfloat16")] * 20 <= b[("flux-dev-1024", "module", "bfloat16")]
    # DiT-XL/2 module bf16 by hand: 56 units x (value + 2 bf16 differences + last input) x 2 CFG rows + RCS
    hid = 256 * 1152
    unit = hid * 2 + 2 * hid * 2 + hid * 2 + 8 + 4 * 8
    assert b[("dit-xl-2-256", "module", "bfloat16")] == 2 * (56 * unit + 3 * hid * 2)
