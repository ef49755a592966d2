"""Paper metrics from weights the user already has on disk: FID and IS (Inception-v3), CLIP score, LPIPS.

Nothing is downloaded. Each network is the real one of a well-kept library, loaded from a local path the recipe
names (``eval.*``):

- ``fid`` / ``is``: ``eval.inception`` = the FID Inception-v3 weights in PyTorch format (torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth``, the TF graph of Heusel et al., arXiv 1706.08500, ported), run by
  torch-fidelity's ``FeatureExtractorInceptionV3`` (2048-d pool features, 1008 logits). FID compares against the
  statistics of ``eval.fid_reference``: an image folder, an ``.npz`` of images (``arr_0``, the ADM layout), or an
  ``.npz`` holding ``mu``/``sigma`` (ADM's reference batches have both); statistics computed from images are
  cached (``QCACHE_CACHE``, default ``~/.cache/qcache``) keyed by the reference and the weights file.
- ``clip_score``: ``eval.clip`` = a transformers CLIP directory (``save_pretrained``; model + processor), score
  100·max(cos, 0) of image and prompt embeddings (Hessel et al., arXiv 2104.08718; the torchmetrics definition).
- ``lpips``: ``eval.lpips`` = torchvision backbone weights (alexnet / vgg16 / squeezenet1_1 ``state_dict``) for the
  ``lpips`` package (Zhang et al., arXiv 1801.03924), whose linear heads ship with the package; a paired metric.

A metric whose weights are not given is reported as null after one line naming the key that enables it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import QcacheError

# what each metric needs, and the recipe key that enables it
ENABLED_BY = {"fid": "eval.inception", "is": "eval.inception", "clip_score": "eval.clip", "lpips": "eval.lpips"}
PAIRED = ("psnr", "ssim", "fid_to_fp", "lpips")  # compare image i with image i of a reference set
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
INCEPTION_BATCH = 32


# ---- Inception-v3 (torch-fidelity) --------------------------------------------------------------------------
def _fidelity_inception_class() -> type:
    """torch-fidelity's ``FeatureExtractorInceptionV3``.

    torch-fidelity's package ``__init__`` imports torchvision (datasets, other extractors); the Inception module
    itself needs only torch. Where torchvision is missing or broken (a CPU torch without a matching torchvision
    wheel), the module is imported on its own under a bare package entry, so the library's code still runs.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        return FeatureExtractorInceptionV3
    except ImportError as e:
        if importlib.util.find_spec("torch_fidelity") is None:
            raise QcacheError("eval.inception: fid and is need the torch-fidelity package "
                              "(pip install 'qcache[metrics]')") from None
        if "torchvision" not in str(e) and "torchvision" not in repr(e.__cause__):
            raise
    spec = importlib.util.find_spec("torch_fidelity")
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
        del sys.modules[name]
    sys.modules["torch_fidelity"] = pkg
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


_INCEPTION: dict[tuple[str, str], torch.nn.Module] = {}


def load_inception(weights: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's FID Inception-v3 with the weights of ``weights`` (never downloaded): outputs (pool 2048-d,
    unbiased logits 1008)."""
    p = Path(weights)
    if not p.is_file():
        raise QcacheError(f"eval.inception: weights file not found: {p}")
    key = (str(p.resolve()), str(device))
    if key not in _INCEPTION:
        cls = _fidelity_inception_class()
        try:
            net = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(p))
        except Exception as e:  # wrong keys or shapes: not the FID Inception
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QcacheError(f"eval.inception: {p} is not FID Inception-v3 weights: {first}") from None
        _INCEPTION[key] = net.to(device).eval()
    return _INCEPTION[key]


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] (C = 1 or 3) -> (N, 3, H, W) uint8, gray replicated."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise QcacheError(f"images: need 1 or 3 channels, got {x.shape[1]}")
    return x.contiguous()


@torch.no_grad()
def inception_outputs(net: torch.nn.Module, images_u8: torch.Tensor,
                      batch_size: int = INCEPTION_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool features (N, 2048), logits (N, 1008)) float64 of uint8 (N, 3, H, W) images."""
    dev = next(net.parameters()).device
    feats, logits = [], []
    for chunk in images_u8.split(batch_size):
        f, lg = net(chunk.to(dev))
        feats.append(f.double().cpu())
        logits.append(lg.double().cpu())
    return torch.cat(feats), torch.cat(logits)


# ---- FID ------------------------------------------------------------------------------------------------------
def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as every FID implementation) of (N, D) features, float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise QcacheError(f"fid: need at least 2 feature rows (N, D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def fid_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Fréchet distance ‖μa−μb‖² + Tr(Σa+Σb−2(ΣaΣb)^½), the trace of the root through the symmetric form
    Σa^½ Σb Σa^½ (as ``qcache.metrics.fid_from_features``), stable for singular covariances."""
    from .metrics import _psd_sqrt

    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise QcacheError(f"fid: statistics of different sizes, {mu_a.shape} and {mu_b.shape}")
    sa = _psd_sqrt(cov_a)
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(sa @ cov_b @ sa), 0, None)).sum())
    fid = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)
    return max(fid, 0.0)


def _cache_dir() -> Path:
    return Path(os.environ.get("QCACHE_CACHE", Path.home() / ".cache" / "qcache")) / "fid-stats"


def _file_key(p: Path) -> str:
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def read_reference_images(ref: Path) -> torch.Tensor:
    """uint8 (N, 3, H, W) images of a folder (sorted file names) or of an ``.npz``'s ``arr_0`` (N, H, W, C)."""
    if ref.is_dir():
        from PIL import Image

        files = sorted(f for f in ref.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        if len(files) < 2:
            raise QcacheError(f"eval.fid_reference: need at least 2 images in {ref}, found {len(files)}")
        arrs = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        shapes = {a.shape for a in arrs}
        if len(shapes) != 1:
            raise QcacheError(f"eval.fid_reference: images of different sizes in {ref}: {sorted(shapes)[:2]}")
        arr = np.stack(arrs)
    else:
        with np.load(ref) as z:
            if "arr_0" not in z.files:
                raise QcacheError(f"eval.fid_reference: {ref} has neither mu/sigma nor images (arr_0)")
            arr = z["arr_0"]
        if arr.ndim != 4 or arr.dtype != np.uint8 or arr.shape[-1] not in (1, 3):
            raise QcacheError(f"eval.fid_reference: arr_0 of {ref} must be uint8 (N, H, W, 1|3), got "
                              f"{arr.dtype} {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def reference_stats(reference: str | Path, weights: str | Path,
                    device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the FID reference: read from an ``.npz`` holding them, else computed from its images with the
    Inception of ``weights`` and cached."""
    ref = Path(reference)
    if not ref.exists():
        raise QcacheError(f"eval.fid_reference: not found: {ref}")
    if ref.is_file():
        if ref.suffix.lower() != ".npz":
            raise QcacheError(f"eval.fid_reference: must be an image folder or an .npz, got {ref}")
        with np.load(ref) as z:
            if "mu" in z.files and "sigma" in z.files:
                return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
        listing = _file_key(ref)
    else:
        listing = "\n".join(_file_key(f) for f in sorted(ref.iterdir()) if f.suffix.lower() in IMAGE_EXTS)
    key = hashlib.sha256(f"{listing}\n{_file_key(Path(weights))}".encode()).hexdigest()[:32]
    cached = _cache_dir() / f"{key}.npz"
    if cached.is_file():
        with np.load(cached) as z:
            return z["mu"], z["sigma"]
    feats, _ = inception_outputs(load_inception(weights, device), read_reference_images(ref))
    mu, sigma = feature_stats(feats)
    import io

    from .cli import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma)
    atomic_write_bytes(cached, buf.getvalue())
    return mu, sigma


# ---- IS -------------------------------------------------------------------------------------------------------
def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception score exp(E KL(p(y|x) ‖ p(y))) over ``splits`` consecutive splits: (mean, std)
    (Salimans et al., arXiv 1606.03498; split as the ADM evaluator and torch-fidelity without shuffling)."""
    p = torch.softmax(logits.double(), dim=1)
    splits = max(1, min(splits, len(p)))
    scores = []
    for part in p.chunk(splits):
        py = part.mean(0, keepdim=True)
        kl = (part * (torch.log(part.clamp_min(1e-300)) - torch.log(py.clamp_min(1e-300)))).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


# ---- CLIP score -----------------------------------------------------------------------------------------------
@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: Sequence[str], clip_dir: str | Path,
               batch_size: int = 32) -> float:
    """Mean CLIP score 100·max(cos(image, prompt), 0) with the transformers CLIP model saved in ``clip_dir``."""
    from transformers import CLIPModel, CLIPProcessor

    d = Path(clip_dir)
    if not (d / "config.json").is_file():
        raise QcacheError(f"eval.clip: no CLIP model (config.json) in {d}")
    if len(prompts) != len(images):
        raise QcacheError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
    try:
        model = CLIPModel.from_pretrained(str(d), local_files_only=True).eval()
        proc = CLIPProcessor.from_pretrained(str(d), local_files_only=True)
    except Exception as e:
        raise QcacheError(f"eval.clip: cannot load CLIP from {d}: {str(e).strip().splitlines()[0]}") from None
    u8 = to_uint8_rgb(images)
    scores = []
    for start in range(0, len(u8), batch_size):
        imgs = list(u8[start:start + batch_size])
        text = list(prompts[start:start + batch_size])
        inp = proc(text=text, images=imgs, return_tensors="pt", padding=True)
        inp = {k: v[:, : model.config.text_config.max_position_embeddings] if k in ("input_ids", "attention_mask")
               else v for k, v in inp.items()}
        img = model.get_image_features(pixel_values=inp["pixel_values"])
        txt = model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        img = img / img.norm(p=2, dim=-1, keepdim=True)
        txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
        scores.append((100 * (img * txt).sum(-1)).clamp_min(0))
    return float(torch.cat(scores).mean())


# ---- LPIPS ----------------------------------------------------------------------------------------------------
def _lpips_net_of(state: dict) -> str:
    if "features.28.weight" in state:
        return "vgg"
    if any(k.startswith("features.12.") for k in state):
        return "squeeze"
    if "features.10.weight" in state:
        return "alex"
    raise QcacheError("eval.lpips: not an alexnet / vgg16 / squeezenet1_1 torchvision state_dict")


@torch.no_grad()
def lpips_distance(a: torch.Tensor, b: torch.Tensor, weights: str | Path, batch_size: int = 16) -> float:
    """Mean LPIPS between paired images in [-1, 1], the ``lpips`` package's model on local backbone weights."""
    p = Path(weights)
    if not p.is_file():
        raise QcacheError(f"eval.lpips: weights file not found: {p}")
    try:
        import lpips
    except ImportError as e:
        raise QcacheError(f"eval.lpips: lpips needs the lpips package and torchvision "
                          f"(pip install 'qcache[metrics]'): {e}") from None
    state = torch.load(p, map_location="cpu", weights_only=True)
    net = _lpips_net_of(state)
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()  # heads: the package's
    torchvision_model = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}[net]
    import torchvision

    backbone = getattr(torchvision.models, torchvision_model)(weights=None)
    backbone.load_state_dict(state)
    feats = backbone.features
    slices = [s for s in vars(model.net).get("_modules", {}).values() if isinstance(s, torch.nn.Sequential)]
    for sl in slices:  # lpips slices hold the torchvision feature layers under their original indices
        for name in list(sl._modules):
            sl._modules[name] = feats[int(name)]
    x, y = a.float().clamp(-1, 1), b.float().clamp(-1, 1)
    if x.shape != y.shape:
        raise QcacheError(f"lpips: paired sets of different shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] == 1:
        x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
    out = [model(xa, ya).flatten() for xa, ya in zip(x.split(batch_size), y.split(batch_size))]
    return float(torch.cat(out).mean())


def read_paired(path: str | Path) -> torch.Tensor:
    """The ``images`` tensor of a ``.safetensors`` sample file (``qcache.evaluate/generate --samples``)."""
    p = Path(path)
    if not p.is_file():
        raise QcacheError(f"--reference: file not found: {p}")
    from safetensors.torch import load_file

    try:
        images = load_file(str(p))["images"]
    except Exception as e:
        raise QcacheError(f"--reference: not a qcache samples file (.safetensors with 'images'): {p}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return images.float()


# ---- selection ------------------------------------------------------------------------------------------------
def local_metrics(images: torch.Tensor, cfg, prompts: Sequence[str] | None = None,
                  reference: torch.Tensor | None = None, log: Callable[[str], None] | None = None,
                  device: str | torch.device = "cpu") -> dict[str, float | None]:
    """The metrics of ``cfg.metrics`` (an ``EvalConfig``) that need local weights or a reference set.

    ``images`` are in [-1, 1]; ``prompts`` (text models) one per image; ``reference`` a paired set (same noise
    and conditions, e.g. full precision) for psnr/ssim/fid_to_fp/lpips. A metric whose weights are not given, or
    that needs prompts or a reference that is not there, is None after one line through ``log``.
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    chosen = list(cfg.metrics)
    out: dict[str, float | None] = {}

    def skip(name: str, why: str) -> None:
        out[name] = None
        log(f"{name}: skipped, {why}")

    u8 = None
    outputs = None
    for name in chosen:
        if name in ENABLED_BY and getattr(cfg, ENABLED_BY[name].split(".")[1]) is None:
            skip(name, f"set {ENABLED_BY[name]} to enable it")
            continue
        if name in PAIRED and reference is None:
            skip(name, "needs a paired reference set (qcache.evaluate --reference)")
            continue
        if name in ("fid", "is"):
            if outputs is None:
                u8 = to_uint8_rgb(images)
                outputs = inception_outputs(load_inception(cfg.inception, device), u8)
            if name == "fid":
                mu_r, sig_r = reference_stats(cfg.fid_reference, cfg.inception, device)
                mu, sig = feature_stats(outputs[0])
                out["fid"] = fid_from_stats(mu, sig, mu_r, sig_r)
            else:
                out["is"], out["is_std"] = inception_score(outputs[1])
        elif name == "clip_score":
            if not prompts:
                skip(name, "needs prompts (a text-conditional model)")
                continue
            out[name] = clip_score(images, prompts, cfg.clip)
        elif name == "lpips":
            out[name] = lpips_distance(reference, images, cfg.lpips)
        elif name in ("psnr", "ssim", "fid_to_fp"):
            from .metrics import compare_sets

            if "psnr" not in out or "ssim" not in out:
                pair = compare_sets(reference, images)
                for k in ("psnr", "ssim", "fid_to_fp"):
                    if k in chosen:
                        out[k] = pair[k]
    return out

