"""Metrics from local weights, on random-weight networks of the real architectures saved in the real formats:
torch-fidelity's FID Inception-v3 (its state_dict), a tiny transformers CLIP (save_pretrained). The numbers are
checked against torchmetrics' own computation with the same networks; without weights each metric is skipped with
one line naming the key that enables it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from qcache.errors import QcacheError
from qcache.recipe import EvalConfig
from tests.conftest import run_module

# find_spec, not import: torch-fidelity's package __init__ needs torchvision, which qcache does without
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None
                                or importlib.util.find_spec("torchmetrics") is None,
                                reason="the metrics extra is not installed (pip install '.[metrics]')")


@pytest.fixture(scope="module", autouse=True)
def fidelity():
    """torch-fidelity's Inception module imported first (qcache's way: without torchvision too), so torchmetrics'
    FID, which imports it, can be the reference."""
    from qcache.metrics_local import _fidelity_inception_class

    return _fidelity_inception_class()


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's FID Inception-v3 with PyTorch's default random init, saved as its state_dict (.pth)."""
    from qcache.metrics_local import _fidelity_inception_class

    cls = _fidelity_inception_class()
    root = tmp_path_factory.mktemp("inception")
    empty = root / "empty.pth"
    torch.save({}, empty)

    class RandomInit(cls):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init at construction
            return None

    torch.manual_seed(0)
    net = RandomInit("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    path = root / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def images(n: int, seed: int, c: int = 3, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, c, size, size), generator=g) * 2 - 1


def u8(x: torch.Tensor) -> torch.Tensor:
    from qcache.metrics_local import to_uint8_rgb

    return to_uint8_rgb(x)


def test_fid_equals_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import _compute_fid

    from qcache.metrics import fid_from_features
    from qcache.metrics_local import feature_stats, fid_from_stats

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 32, generator=g, dtype=torch.float64)
    b = torch.randn(300, 32, generator=g, dtype=torch.float64) * 1.3 + 0.2
    ours = fid_from_stats(*feature_stats(a), *feature_stats(b))
    mu_a, cov_a = a.mean(0), torch.cov(a.T)
    mu_b, cov_b = b.mean(0), torch.cov(b.T)
    ref = float(_compute_fid(mu_a, cov_a, mu_b, cov_b))
    assert ours == pytest.approx(ref, rel=1e-9)
    assert ours == pytest.approx(fid_from_features(a, b), rel=1e-12)
    assert fid_from_stats(*feature_stats(a), *feature_stats(a)) == pytest.approx(0.0, abs=1e-8)


def test_fid_and_is_end_to_end_match_torchmetrics(inception_weights: Path, tmp_path: Path, monkeypatch):
    from PIL import Image
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    from qcache.metrics_local import inception_score, load_inception, local_metrics, reference_stats

    monkeypatch.setenv("QCACHE_CACHE", str(tmp_path / "cache"))
    ref_imgs, gen = images(3, 1), images(3, 2, c=1)  # one-channel samples are replicated to RGB
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, im in enumerate(u8(ref_imgs)):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    cfg = EvalConfig(metrics=["fid", "is"], inception=str(inception_weights), fid_reference=str(folder))
    got = local_metrics(gen, cfg, log=lambda s: pytest.fail(s))
    assert list((tmp_path / "cache" / "fid-stats").glob("*.npz"))  # reference statistics cached

    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(inception_weights))
    fid.update(u8(ref_imgs), real=True)
    fid.update(u8(gen), real=False)
    assert got["fid"] > 0 and got["fid"] == pytest.approx(float(fid.compute()), rel=1e-4)

    net = load_inception(inception_weights)
    seen = []

    class Logits(torch.nn.Module):
        def forward(self, x):
            seen.append(net(x)[1])
            return seen[-1]

    isc = InceptionScore(feature=Logits(), splits=1)
    isc.update(u8(gen))
    mean, _ = isc.compute()
    assert inception_score(torch.cat(seen), splits=1)[0] == pytest.approx(float(mean), rel=1e-5)
    assert got["is"] >= 1.0 and got["is"] == inception_score(torch.cat(seen))[0]

    # an .npz reference: images (ADM layout) give the folder's statistics; stored mu/sigma are used as given
    npz = tmp_path / "ref.npz"
    np.savez(npz, u8(ref_imgs).permute(0, 2, 3, 1).numpy())
    mu_f, sig_f = reference_stats(folder, inception_weights)
    mu_n, sig_n = reference_stats(npz, inception_weights)
    assert np.allclose(mu_f, mu_n) and np.allclose(sig_f, sig_n)
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.arange(3.0), sigma=np.eye(3))
    mu_s, sig_s = reference_stats(stats, inception_weights)
    assert mu_s.tolist() == [0.0, 1.0, 2.0] and np.array_equal(sig_s, np.eye(3))


def test_bad_inception_weights_fail_in_one_line(tmp_path: Path):
    from qcache.metrics_local import load_inception

    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(QcacheError, match=r"^eval.inception: .* is not FID Inception-v3 weights: "):
        load_inception(bad)
    with pytest.raises(QcacheError, match=r"^eval.inception: weights file not found"):
        load_inception(tmp_path / "missing.pth")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIPModel with a CLIP tokenizer and image processor, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tests.tiny_pipelines import clip_tokenizer

    torch.manual_seed(0)
    tok = clip_tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=48, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    d = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).eval().save_pretrained(d)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(d)
    return d


def test_clip_score_matches_clips_own_forward(clip_dir: Path):
    from transformers import CLIPModel, CLIPProcessor

    from qcache.metrics_local import clip_score, local_metrics
    from tests.tiny_pipelines import prompts

    imgs, texts = images(4, 3), prompts(4)
    ours = clip_score(imgs, texts, clip_dir)
    # the reference: CLIP's own forward, whose logits are exp(logit_scale) * cos(image, text)
    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        out = model(**proc(text=texts, images=list(u8(imgs)), return_tensors="pt", padding=True))
    ref = (100 * out.logits_per_image.diagonal() / model.logit_scale.exp()).clamp_min(0).mean().detach()
    assert ours == pytest.approx(float(ref), rel=1e-5, abs=1e-5)
    cfg = EvalConfig(metrics=["clip_score"], clip=str(clip_dir))
    assert local_metrics(imgs, cfg, prompts=texts)["clip_score"] == ours
    lines = []
    assert local_metrics(imgs, cfg, prompts=None, log=lines.append) == {"clip_score": None}
    assert lines == ["clip_score: skipped, needs prompts (a text-conditional model)"]


def test_every_metric_without_weights_is_skipped_in_one_line():
    from qcache.metrics_local import local_metrics

    lines: list[str] = []
    cfg = EvalConfig(metrics=["fid", "is", "clip_score", "lpips", "psnr", "ssim", "fid_to_fp"])
    got = local_metrics(images(3, 0), cfg, prompts=["a", "b", "c"], log=lines.append)
    assert got == {k: None for k in cfg.metrics}
    assert lines == [
        "fid: skipped, set eval.inception to enable it",
        "is: skipped, set eval.inception to enable it",
        "clip_score: skipped, set eval.clip to enable it",
        "lpips: skipped, set eval.lpips to enable it",
        "psnr: skipped, needs a paired reference set (qcache.evaluate --reference)",
        "ssim: skipped, needs a paired reference set (qcache.evaluate --reference)",
        "fid_to_fp: skipped, needs a paired reference set (qcache.evaluate --reference)",
    ]
    ref = images(3, 0)
    paired = local_metrics(ref, EvalConfig(metrics=["psnr", "ssim"]), reference=ref.clone())
    assert paired == {"psnr": 100.0, "ssim": pytest.approx(1.0)}


def test_lpips_with_local_backbone_weights(tmp_path: Path):
    tv = pytest.importorskip("torchvision", reason="LPIPS's backbones are torchvision models")
    pytest.importorskip("lpips")
    from qcache.metrics_local import lpips_distance

    torch.manual_seed(0)
    path = tmp_path / "alexnet-random.pth"
    torch.save(tv.models.alexnet(weights=None).state_dict(), path)
    a, b = images(2, 0, size=32), images(2, 1, size=32)
    assert lpips_distance(a, a, path) == pytest.approx(0.0, abs=1e-6)
    assert lpips_distance(a, b, path) > 0


def test_evaluate_cli_reports_the_selected_metrics(inception_weights: Path, tmp_path: Path):
    base = {"model": {"source": "builtin:digits", "device": "cpu"}, "sampling": {"steps": 2, "batch_size": 8},
            "eval": {"latency_repeats": 1, "latency_samples": 2}}
    r0 = tmp_path / "plain.yaml"
    r0.write_text(yaml.safe_dump(base))
    first = tmp_path / "first.safetensors"
    p = run_module("qcache.evaluate", str(r0), "--n", "3", "--samples", str(first), "--no-progress")
    assert p.returncode == 0, p.stderr
    ref = tmp_path / "ref.npz"
    from safetensors.torch import load_file

    from qcache.sample import to_rgb_uint8

    np.savez(ref, to_rgb_uint8(load_file(str(first))["images"]))
    r1 = tmp_path / "metrics.yaml"
    r1.write_text(yaml.safe_dump({**base, "eval": {**base["eval"], "metrics": [
        "class_accuracy", "fid_data", "fid", "is", "clip_score", "psnr", "ssim", "fid_to_fp"],
        "inception": str(inception_weights), "fid_reference": str(ref)}}))
    out = tmp_path / "m.json"
    p = run_module("qcache.evaluate", str(r1), "--n", "3", "--json", str(out), "--reference", str(first),
                   "--no-progress")
    assert p.returncode == 0, p.stderr
    m = json.loads(out.read_text())
    assert m["fid"] == pytest.approx(0.0, abs=1e-6)  # the same images as the reference
    assert m["is"] >= 1.0 and m["psnr"] == 100.0 and m["ssim"] == pytest.approx(1.0)
    assert m["fid_to_fp"] == pytest.approx(0.0, abs=1e-6) and m["clip_score"] is None
    assert "clip_score: skipped, set eval.clip to enable it" in p.stderr
    assert 0.0 <= m["class_accuracy"] <= 1.0
