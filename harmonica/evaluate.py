"""Image-quality instruments for the testbed and for cached-vs-uncached comparisons.

Image convention: every function here takes images as float tensors ``(N, C, H, W)``. The classifier
metrics (FID-FMNIST, accuracy) expect the DiT's range [-1, 1] and clamp to it, as saving the images
would. PSNR and SSIM take ``value_range``: (-1, 1) (the default) or (0, 1); SSIM maps the images to
[0, 1] first, because its luminance term assumes non-negative intensities (on [-1, 1] data the means
can cancel and the index would change with the range convention).

FID-FMNIST is the Frechet distance between Gaussian fits of the penultimate features of the bundled
Fashion-MNIST classifier, against the bundled statistics of the 10,000 test images. Like every FID it
is biased upwards at small sample counts: compare numbers only at equal sample counts.

Two bundled classifiers judge samples (``harmonica.testbed.classifier.RECIPES``): ``"fid"``, trained
with shifts and label smoothing, whose features define FID-FMNIST and precision/recall, and
``"strict"``, trained without either. Accuracies are best read relative to the classifier's own
test accuracy (``classifier_test_accuracy``), which :func:`quality` reports alongside.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "load_classifier",
    "reference_statistics",
    "classifier_features",
    "classifier_logits",
    "fid_fmnist",
    "classifier_accuracy",
    "classifier_test_accuracy",
    "precision_recall",
    "real_features",
    "quality",
    "psnr",
    "ssim",
]

_ASSETS = Path(__file__).resolve().parent / "testbed" / "assets"


def _as_numpy64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)``, float64, of features ``(N, D)``."""
    f = _as_numpy64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    tr((S1 S2)^1/2) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^1/2 S2 S1^1/2 (same spectrum as S1 S2). Working with symmetric eigendecompositions
    avoids the complex round-off that a general matrix square root produces for near-singular
    covariances (e.g. fewer samples than feature dimensions).
    """
    mu1, mu2 = _as_numpy64(mu1), _as_numpy64(mu2)
    s1, s2 = _as_numpy64(sigma1), _as_numpy64(sigma2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1_half @ s2 @ s1_half
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _classifier_path(which: str) -> Path:
    from .testbed.classifier import RECIPES

    if which not in RECIPES:
        raise ValueError(f"which={which!r} is not a bundled classifier; choose one of {', '.join(RECIPES)}")
    path = _ASSETS / RECIPES[which].file
    if not path.exists():
        flag = "classifier" if which == "fid" else f"{which}-classifier"
        raise FileNotFoundError(f"{path} is missing; train and export it with "
                                f"`python -m harmonica.testbed.train --what {flag} --export`")
    return path


@lru_cache(maxsize=8)
def _classifier(device: str, which: str):
    from safetensors.torch import load_file
    from .testbed.classifier import build_classifier

    path = _classifier_path(which)  # validates `which` first
    model = build_classifier(which)
    model.load_state_dict(load_file(str(path)))
    model.eval().requires_grad_(False)
    return model.to(device)


def load_classifier(device: str | torch.device = "cpu", which: str = "fid"):
    """A bundled Fashion-MNIST classifier (eval mode, frozen, float32), ``which`` in {"fid", "strict"}.
    Cached per device."""
    return _classifier(str(torch.device(device)), which)


@lru_cache(maxsize=4)
def classifier_test_accuracy(which: str = "fid") -> float:
    """The bundled classifier's accuracy on the 10,000 Fashion-MNIST test images (recorded at export)."""
    from safetensors import safe_open

    with safe_open(str(_classifier_path(which)), framework="pt") as f:
        return float(f.metadata()["test_accuracy"])


@lru_cache(maxsize=1)
def _reference() -> tuple[np.ndarray, np.ndarray]:
    from safetensors.torch import load_file

    stats = load_file(str(_ASSETS / "fid_stats_test.safetensors"))
    return stats["mu"].double().numpy(), stats["sigma"].double().numpy()


def reference_statistics() -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and covariance of the 10,000 Fashion-MNIST test images (bundled)."""
    mu, sigma = _reference()
    return mu.copy(), sigma.copy()


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1:] != (1, 28, 28):
        raise ValueError(f"images must be (N, 1, 28, 28) in [-1, 1], got shape {tuple(images.shape)}")
    return images


@torch.no_grad()
def _run_classifier(images: torch.Tensor, fn: str, classifier, batch_size: int) -> torch.Tensor:
    images = _check_images(images)
    classifier = classifier if classifier is not None else load_classifier(images.device)
    device = next(classifier.parameters()).device
    outs = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device=device, dtype=torch.float32).clamp(-1, 1)
        outs.append(getattr(classifier, fn)(x).cpu())
    return torch.cat(outs)


def classifier_features(images: torch.Tensor, classifier=None, batch_size: int = 500) -> torch.Tensor:
    """Penultimate classifier features ``(N, D)`` of images in [-1, 1]."""
    return _run_classifier(images, "features", classifier, batch_size)


def classifier_logits(images: torch.Tensor, classifier=None, batch_size: int = 500) -> torch.Tensor:
    return _run_classifier(images, "forward", classifier, batch_size)


def fid_fmnist(images: torch.Tensor, classifier=None, reference=None, batch_size: int = 500) -> float:
    """FID-FMNIST of generated images ``(N, 1, 28, 28)`` in [-1, 1] against the test-set statistics
    (or against ``reference=(mu, sigma)``)."""
    mu_ref, sigma_ref = reference if reference is not None else _reference()
    mu, sigma = feature_statistics(classifier_features(images, classifier, batch_size))
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


def classifier_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier=None,
                        batch_size: int = 500) -> float:
    """Fraction of images the classifier assigns to their conditioning label."""
    labels = torch.as_tensor(labels).cpu()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    pred = classifier_logits(images, classifier, batch_size).argmax(1)
    return (pred == labels).double().mean().item()


def _unit_pair(x: torch.Tensor, ref: torch.Tensor, value_range) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images in float64, mapped from ``value_range`` to [0, 1]."""
    if x.shape != ref.shape or x.ndim != 4:
        raise ValueError(f"expected two (N, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(ref.shape)}")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    x = (x.detach().double() - lo) / (hi - lo)
    ref = (ref.detach().to(x.device).double() - lo) / (hi - lo)
    return x, ref


def psnr(x: torch.Tensor, ref: torch.Tensor, value_range=(-1.0, 1.0)) -> torch.Tensor:
    """Per-image PSNR in dB ``(N,)`` of ``x`` against ``ref`` (e.g. a cached run against the uncached
    run from the same noise); ``inf`` where the images are identical. ``value_range`` is the images'
    nominal range: (-1, 1) for the DiT's output, (0, 1) for normalised images."""
    x, ref = _unit_pair(x, ref, value_range)
    mse = (x - ref).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, ref: torch.Tensor, value_range=(-1.0, 1.0),
         window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM ``(N,)`` (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01,
    K2 = 0.03, valid positions only), averaged over channels and positions, computed on the images
    mapped from ``value_range`` ((-1, 1) for the DiT's output, (0, 1) for normalised images) to [0, 1]."""
    x, ref = _unit_pair(x, ref, value_range)
    c = x.shape[1]
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images {tuple(x.shape[-2:])} are smaller than the {window_size}x{window_size} window")
    win = _gaussian_window(window_size, sigma, c, x.device)

    def blur(t):
        return F.conv2d(t, win, groups=c)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_x, mu_y = blur(x), blur(ref)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(ref * ref) - mu_y ** 2
    cov = blur(x * ref) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(1)


def _kth_neighbour_distance(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (the row itself, at distance 0, excluded)."""
    d = torch.cdist(features, features)
    return d.topk(k + 1, dim=1, largest=False).values[:, k]


def precision_recall(gen_features, real_features, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019) of generated features ``(G, D)``
    against real features ``(R, D)``.

    Each set's manifold is the union of balls around its points with radius the distance to the
    point's k-th nearest neighbour in the same set. Precision: fraction of generated samples inside
    the real manifold (are the samples realistic?); recall: fraction of real samples inside the
    generated manifold (is the data's variety covered?). Both depend on G, R and k: compare at equal
    counts (the paper uses G = R and k = 3).
    """
    gen = torch.as_tensor(gen_features).double()
    real = torch.as_tensor(real_features).double()
    if gen.ndim != 2 or real.ndim != 2 or gen.shape[1] != real.shape[1]:
        raise ValueError(f"features must be (G, D) and (R, D), got {tuple(gen.shape)} and {tuple(real.shape)}")
    if min(gen.shape[0], real.shape[0]) <= k:
        raise ValueError(f"need more than k={k} samples in each set, got {gen.shape[0]} and {real.shape[0]}")
    real_radii = _kth_neighbour_distance(real, k)
    gen_radii = _kth_neighbour_distance(gen, k)
    d = torch.cdist(gen, real)                                   # (G, R)
    precision = (d <= real_radii[None, :]).any(dim=1).double().mean().item()
    recall = (d <= gen_radii[:, None]).any(dim=0).double().mean().item()
    return precision, recall


@lru_cache(maxsize=4)
def _real_images(n: int, seed: int) -> torch.Tensor:
    from .testbed.data import load_tensors

    images, _ = load_tensors("test")
    if not 0 < n <= images.shape[0]:
        raise ValueError(f"n must be in 1..{images.shape[0]}, got {n}")
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx]


@lru_cache(maxsize=4)
def _bundled_real_features(n: int, seed: int) -> torch.Tensor:
    return classifier_features(_real_images(n, seed))


def real_features(n: int, seed: int = 0, classifier=None) -> torch.Tensor:
    """Features of ``n`` Fashion-MNIST test images drawn with ``seed`` (the real set of
    :func:`precision_recall`; needs the dataset on disk), by the bundled FID classifier or ``classifier``."""
    if classifier is None:
        return _bundled_real_features(n, seed).clone()
    return classifier_features(_real_images(n, seed), classifier)


def quality(images: torch.Tensor, labels=None, *, reference: torch.Tensor | None = None, strict: bool = True,
            precision_recall_k: int | None = 3, device=None, classifier=None, strict_classifier=None,
            fid_statistics=None) -> dict[str, float]:
    """Every quality measure of one batch of generated images ``(N, 1, 28, 28)`` in [-1, 1].

    * ``fid_fmnist``; ``precision`` / ``recall`` against ``N`` test images (k = ``precision_recall_k``,
      None to skip; needs the dataset on disk);
    * with ``labels``: ``accuracy`` (FID classifier) and, if ``strict``, ``strict_accuracy``, each also as
      a fraction of that classifier's test accuracy (``accuracy_rel``, ``strict_accuracy_rel``);
    * with ``reference`` (e.g. the uncached images from the same noise): ``psnr`` and ``ssim``, means
      over images (identical images count as 1000 dB, as in the comparison table).

    ``device``: where the classifiers run (default: the images' device). ``classifier``,
    ``strict_classifier``, ``fid_statistics``: replacements of the bundled FID classifier, strict
    classifier and test-set statistics (tests use small random ones); the relative accuracies are
    given for the bundled classifiers only.
    """
    device = torch.device(device) if device is not None else images.device
    judges = {"fid": classifier, "strict": strict_classifier}
    bundled = {which: judge is None for which, judge in judges.items()}
    judges = {which: judge if judge is not None else load_classifier(device, which)
              for which, judge in judges.items() if which == "fid" or strict}
    feats = classifier_features(images, judges["fid"])
    stats = fid_statistics if fid_statistics is not None else _reference()
    out = {"num_samples": int(images.shape[0]), "fid_fmnist": frechet_distance(*feature_statistics(feats), *stats)}
    if precision_recall_k:
        real = real_features(images.shape[0], classifier=None if bundled["fid"] else judges["fid"])
        out["precision"], out["recall"] = precision_recall(feats, real, precision_recall_k)
    if labels is not None:
        for which, judge in judges.items():
            key = "accuracy" if which == "fid" else f"{which}_accuracy"
            out[key] = classifier_accuracy(images, labels, judge)
            if bundled[which]:
                out[key + "_rel"] = out[key] / classifier_test_accuracy(which)
    if reference is not None:
        out["psnr"] = float(psnr(images, reference).clamp(max=1e3).mean())
        out["ssim"] = float(ssim(images, reference).mean())
    return out
