"""Frechet distance between Gaussian fits of image features: FID (Heusel et al. 2017, arXiv:1706.08500) and
its proxies on other feature networks, with KID and precision/recall on the same features.

Protocol. Images (see :mod:`fdistill.metrics.image_sources` for the accepted inputs and their conventions)
go through a :class:`FeatureNet`; the mean and covariance of the features are compared with reference
statistics by ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``. Backends:

- ``clean``, ``legacy_pytorch``, ``legacy_tensorflow``: clean-fid's resizing for that mode (Parmar et al.
  2022, arXiv:2104.11222; PIL bicubic, PyTorch bilinear, or inside the network), its folder reader, and
  its Frechet distance;
- ``torchmetrics``: images resized inside the feature network, the distance by torchmetrics'
  ``FrechetInceptionDistance`` (the in-memory route; training-time hooks use it).

Only ``inception`` with at least 10,000 samples is reported as "FID"; below that it is a "proxy FID", and any
other feature network gives "FD". Results from different feature networks (name or weights hash) are never
compared: such a reference is refused. Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from tqdm import tqdm

from fdistill.metrics.image_sources import open_source
from fdistill.metrics.kid_pr import kernel_inception_distance, precision_recall

BACKENDS = ("clean", "legacy_pytorch", "legacy_tensorflow", "torchmetrics")
FEATURE_NETS = ("inception", "fdistill-digits", "fdistill-shapes")
FEATURE_DIMS = {"inception": 2048, "fdistill-digits": 64, "fdistill-shapes": 64}  # an FD needs more images than this
FULL_FID_SAMPLES = 10_000
CLEANFID_INCEPTION = "inception-2015-12-05.pt"  # StyleGAN/clean-fid TorchScript export of the TF graph
PYTORCH_FID_INCEPTION = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid port (clean-fid legacy_pytorch)
TORCH_FIDELITY_INCEPTION = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity / torchmetrics


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of features shaped [N, D]."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be [N>=2, D], got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) in float64 (Heusel et al. 2017, eq. 6).

    When S1 S2 is near-singular, eps * I is added to both covariances before the square root, as in the
    reference TTUR / pytorch-fid implementations; a negligible imaginary part from sqrtm is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics shapes differ: {mu1.shape}{sigma1.shape} vs {mu2.shape}{sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products (e.g. always-zero ReLU features) are handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def file_hash(path: str | Path) -> str:
    """First 16 hex digits of a file's sha256 (the convention of ``fdistill.metrics.features``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def module_hash(module: nn.Module) -> str:
    """First 16 hex digits of the sha256 over a module's state dict (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureNet(nn.Module):
    """Images (uint8 or float in [0, 255], NCHW, 1 or 3 channels) -> features [N, D], plus the identity a
    result records: ``name`` (default: the class name of ``net``) and ``weights_hash`` (default: the hash of
    its state dict). Channels are matched to ``in_channels`` (mean to gray, repeat to RGB) and, when
    ``input_size`` is set, images are resized (bilinear, antialiased) to it. The default ``embed`` feeds
    ``net`` images in [-1, 1], the range of fdistill's models."""

    def __init__(self, net: nn.Module, name: str | None = None, weights_hash: str | None = None,
                 in_channels: int = 3, input_size: int | None = None):
        super().__init__()
        self.net = net.eval()
        self.name = name or type(net).__name__
        self.weights_hash = weights_hash or module_hash(net)
        self.in_channels, self.input_size = in_channels, input_size

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 127.5 - 1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] != self.in_channels:
            x = x.mean(1, keepdim=True) if self.in_channels == 1 else x.expand(-1, self.in_channels, -1, -1)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.embed(x).flatten(1).float()


class _ClassifierFeatureNet(FeatureNet):
    """The shipped classifiers (digits, captioned-shapes attributes): their penultimate ``features``."""

    def embed(self, x):
        return self.net.features(x / 127.5 - 1)


class _TorchScriptInception(FeatureNet):
    """clean-fid's ``InceptionV3W``: at 299 px the layers get (x - 128) / 128, otherwise the graph resizes
    inside (TF1 bilinear, the legacy_tensorflow and torchmetrics protocol)."""

    def embed(self, x):
        if tuple(x.shape[-2:]) == (299, 299):
            return self.net.layers.forward((x - 128) / 128)
        return self.net(x, return_features=True)


class _PytorchFidInception(FeatureNet):
    def embed(self, x):
        return self.net(x / 255)[0]


class _TorchFidelityInception(FeatureNet):
    def embed(self, x):
        return self.net(x.round().clamp(0, 255).to(torch.uint8))


def inception_weight_paths(backend: str = "clean") -> list[Path]:
    """Where the libraries keep the Inception weights for ``backend``: clean-fid's TorchScript file in the
    system temp directory, pytorch-fid's and torch-fidelity's files in torch hub's ``checkpoints``."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if backend == "legacy_pytorch":
        return [hub / PYTORCH_FID_INCEPTION]
    paths = [Path(tempfile.gettempdir()) / CLEANFID_INCEPTION]
    return paths + [hub / TORCH_FIDELITY_INCEPTION] if backend == "torchmetrics" else paths


def load_inception(weights: str | Path | None = None, backend: str = "clean") -> FeatureNet:
    """The standard FID Inception (pool3, 2048-d) from a local file; never downloads."""
    candidates = [Path(weights)] if weights is not None else inception_weight_paths(backend)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"Inception weights not found (looked for {', '.join(map(str, candidates))}); put "
            f"{candidates[0].name} there or pass --inception-weights PATH (offline: nothing is downloaded)")
    digest = file_hash(path)
    if path.name == PYTORCH_FID_INCEPTION:
        if path != inception_weight_paths("legacy_pytorch")[0]:  # pytorch-fid loads it from torch hub's cache
            raise ValueError(f"{path.name} is read from {inception_weight_paths('legacy_pytorch')[0]} only")
        from cleanfid.inception_pytorch import InceptionV3

        net = InceptionV3(output_blocks=[3], resize_input=True).eval()
        return _PytorchFidInception(net, "inception", digest)
    if path.name == TORCH_FIDELITY_INCEPTION:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ValueError(f"{path.name} is torch-fidelity's format: pip install torch-fidelity, or use "
                             f"clean-fid's {CLEANFID_INCEPTION}")

        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(path))
        return _TorchFidelityInception(net, "inception", digest)
    return _TorchScriptInception(torch.jit.load(str(path), map_location="cpu"), "inception", digest)


def load_feature_net(features: str | nn.Module = "fdistill-digits", backend: str = "clean",
                     inception_weights: str | Path | None = None) -> FeatureNet:
    """A :class:`FeatureNet` by name (``inception``, ``fdistill-digits``, ``fdistill-shapes``) or wrapping any
    ``nn.Module`` (see :class:`FeatureNet`; build one yourself for a 1-channel or fixed-size network)."""
    if isinstance(features, FeatureNet):
        return features
    if isinstance(features, nn.Module):
        return FeatureNet(features)
    if features == "inception":
        return load_inception(inception_weights, backend)
    if features == "fdistill-digits":
        from fdistill.metrics.features import load_digits_classifier, weights_hash

        net = load_digits_classifier()
        return _ClassifierFeatureNet(net, "fdistill-digits", weights_hash(), in_channels=1, input_size=16)
    if features == "fdistill-shapes":
        from fdistill.metrics.attributes import SHAPES_ATTRIBUTES_DIR, load_attribute_classifier
        from fdistill.metrics.features import WEIGHTS_FILE, weights_hash

        net = load_attribute_classifier()
        return _ClassifierFeatureNet(net, "fdistill-shapes", weights_hash(SHAPES_ATTRIBUTES_DIR / WEIGHTS_FILE),
                                     input_size=32)
    raise ValueError(f"unknown feature network {features!r}; choose one of {', '.join(FEATURE_NETS)}")


@dataclass
class ReferenceStats:
    """Gaussian statistics of a reference set and the protocol they were computed under."""

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int
    feature_net: str
    weights_hash: str
    backend: str
    source: str
    features: np.ndarray | None = None  # kept only when asked (KID and precision/recall need them)

    def check_compatible(self, net: FeatureNet) -> None:
        if (self.feature_net, self.weights_hash) != (net.name, net.weights_hash):
            raise ValueError(f"reference statistics use {self.feature_net} ({self.weights_hash}) but samples "
                             f"use {net.name} ({net.weights_hash}); rebuild them with eval/fid.py ref")


def save_statistics(stats: ReferenceStats, path: str | Path) -> None:
    """Write statistics and their protocol metadata to an ``.npz`` (loadable without pickle)."""
    extra = {} if stats.features is None else {"features": stats.features}
    np.savez(path, mu=stats.mu, sigma=stats.sigma, num_samples=stats.num_samples,
             feature_net=stats.feature_net, weights_hash=stats.weights_hash, backend=stats.backend,
             source=stats.source, **extra)


def load_statistics(path: str | Path) -> ReferenceStats:
    """Read a statistics ``.npz`` written by :func:`save_statistics`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"statistics file not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        missing = {"mu", "sigma", "num_samples", "feature_net", "weights_hash"} - set(data.files)
        if missing:
            raise ValueError(f"{path} lacks {', '.join(sorted(missing))}: not fdistill statistics; "
                             "rebuild them with `eval/fid.py ref`")
        return ReferenceStats(data["mu"], data["sigma"], int(data["num_samples"]), str(data["feature_net"]),
                              str(data["weights_hash"]), str(data.get("backend", "unknown")),
                              f"stats {path} of {data.get('source', 'unknown')}",
                              data["features"] if "features" in data else None)


def _cleanfid_resizer(backend: str, size: int | None):
    from cleanfid.resize import make_resizer

    if backend == "legacy_tensorflow" or size is None:
        return lambda x: x
    if backend == "clean":
        return make_resizer("PIL", False, "bicubic", (size, size))
    return make_resizer("PyTorch", False, "bilinear", (size, size))


class _Moments:
    """Streaming sums of features (float64), so statistics never need all images or features at once."""

    def __init__(self, keep: bool):
        self.n, self.total, self.outer = 0, 0.0, 0.0
        self.kept: list[np.ndarray] | None = [] if keep else None

    def add(self, feats: np.ndarray) -> None:
        feats = np.asarray(feats, np.float64)
        self.n += len(feats)
        self.total = self.total + feats.sum(0)
        self.outer = self.outer + feats.T @ feats
        if self.kept is not None:
            self.kept.append(feats.astype(np.float32))

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 images for statistics, got {self.n}")
        mu = self.total / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def compute_statistics(source, feature_net: FeatureNet, backend: str = "clean", *, batch_size: int = 256,
                       keep_features: bool = False, progress: bool = True, device="cpu") -> ReferenceStats:
    """Statistics of ``source``'s features under ``backend``'s preprocessing, accumulated batch by batch."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    images = open_source(source, batch_size)
    net = feature_net.to(device).eval()
    moments = _Moments(keep_features)
    size = 299 if net.name == "inception" else net.input_size
    if backend != "torchmetrics" and images.folder is not None:
        from cleanfid.fid import get_folder_features

        with contextlib.redirect_stdout(sys.stderr):  # clean-fid prints; keep stdout for results
            moments.add(get_folder_features(str(images.folder), net, num_workers=0, batch_size=batch_size,
                                            device=torch.device(device), mode=backend, verbose=progress,
                                            custom_fn_resize=_cleanfid_resizer(backend, size),
                                            description=f"features {images.folder.name}"))
    else:
        resize = None if backend == "torchmetrics" else _cleanfid_resizer(backend, size)
        total = None if images.total is None else -(-images.total // batch_size)
        for batch in tqdm(images.batches, total=total, desc="features", disable=not progress):
            if resize is not None:  # clean-fid resizes each HWC RGB image on its own, as get_model_features
                rgb = batch.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
                batch = torch.stack([torch.as_tensor(resize(img)).permute(2, 0, 1) for img in rgb])
            moments.add(net(batch.to(device)).cpu().numpy())
    mu, sigma = moments.statistics()
    kept = None if moments.kept is None else np.concatenate(moments.kept)
    return ReferenceStats(mu, sigma, moments.n, net.name, net.weights_hash, backend, images.description, kept)


def _is_statistics_file(path) -> bool:
    if not (isinstance(path, (str, Path)) and str(path).endswith(".npz") and Path(path).is_file()):
        return False
    with np.load(path, allow_pickle=False) as data:
        return "mu" in data.files


def reference_statistics(reference, feature_net: FeatureNet, backend: str = "clean",
                         **kwargs) -> ReferenceStats:
    """``reference`` as statistics for ``feature_net``: a :class:`ReferenceStats`, a statistics ``.npz``
    (checked to match the feature network), or any image source (computed)."""
    if _is_statistics_file(reference):
        reference = load_statistics(reference)
    if isinstance(reference, ReferenceStats):
        reference.check_compatible(feature_net)
        return reference
    return compute_statistics(reference, feature_net, backend, **kwargs)


def check_sample_count(stats: ReferenceStats, what: str) -> None:
    """A Frechet distance needs a full-rank covariance: more images than feature dimensions."""
    dim = len(stats.mu)
    if stats.num_samples <= dim:
        raise ValueError(f"{what}: {stats.num_samples} images give a singular covariance of {dim}-d "
                         f"{stats.feature_net} features, so the FD would mean nothing; use at least {dim + 1}")


def _torchmetrics_fd(a: ReferenceStats, b: ReferenceStats) -> float:
    """torchmetrics' FID computation on the two sets' sums, loaded into its metric states."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    identity = nn.Identity()
    identity.num_features = len(a.mu)
    metric = FrechetInceptionDistance(feature=identity)
    for prefix, stats in (("real", a), ("fake", b)):
        mu, n = torch.from_numpy(np.asarray(stats.mu, np.float64)), stats.num_samples
        sigma = torch.from_numpy(np.asarray(stats.sigma, np.float64))
        setattr(metric, f"{prefix}_features_sum", mu * n)
        setattr(metric, f"{prefix}_features_cov_sum", sigma * (n - 1) + n * torch.outer(mu, mu))
        setattr(metric, f"{prefix}_features_num_samples", torch.tensor(n))
    metric.orig_dtype = torch.float64
    with warnings.catch_warnings():  # the states were set directly, not through ``update``
        warnings.filterwarnings("ignore", message=".*called before the ``update`` method.*")
        return float(metric.compute())


def compute_fid(samples, reference, features: str | nn.Module = "fdistill-digits", backend: str = "clean", *,
                inception_weights: str | Path | None = None, batch_size: int = 256, kid: bool = False,
                precision_recall_k: int | None = None, seeds=None, steps=None, progress: bool = True,
                device="cpu") -> dict:
    """FD/FID of ``samples`` against ``reference`` (both any image source; the reference may also be a
    statistics file or :class:`ReferenceStats`), with optional KID and precision/recall (k-NN manifolds with
    ``precision_recall_k`` neighbours, 3 in the paper). Returns a flat dict: the value and its protocol."""
    net = load_feature_net(features, backend, inception_weights)
    keep = kid or precision_recall_k is not None
    opts = dict(batch_size=batch_size, keep_features=keep, progress=progress, device=device)
    if _is_statistics_file(reference):  # a mismatched file is refused before any work
        reference = load_statistics(reference)
        reference.check_compatible(net)
    fake = compute_statistics(samples, net, backend, **opts)  # bad samples fail before reference images
    check_sample_count(fake, "samples")
    ref = reference_statistics(reference, net, backend, **opts)
    check_sample_count(ref, "reference")
    if keep and ref.features is None:
        raise ValueError("KID and precision/recall need reference features: build the statistics with "
                         "`eval/fid.py ref --keep-features` or pass the reference images")
    if backend == "torchmetrics":
        value = _torchmetrics_fd(ref, fake)
    else:  # clean-fid's own frechet_distance passes sqrtm(disp=False), which SciPy >= 1.18 no longer takes
        value = frechet_distance(fake.mu, fake.sigma, ref.mu, ref.sigma)
    inception = net.name == "inception"
    full = inception and fake.num_samples >= FULL_FID_SAMPLES
    result = {"metric": "FID" if full else "proxy FID" if inception else "FD", "value": value,
              "proxy": not full, "num_samples": fake.num_samples, "num_reference": ref.num_samples,
              "feature_net": net.name, "weights_hash": net.weights_hash, "backend": backend,
              "reference_backend": ref.backend, "samples": fake.source, "reference": ref.source}
    result.update({k: v for k, v in (("seeds", seeds), ("steps", steps)) if v is not None})
    if kid:
        result.update(kernel_inception_distance(ref.features, fake.features))
    if precision_recall_k is not None:
        result.update(precision_recall(ref.features, fake.features, k=precision_recall_k))
    return result


def frechet_distance_to_reference(images, reference, feature_net: str | nn.Module = "fdistill-digits",
                                  **kwargs) -> dict:
    """FD of in-memory images (a float [-1, 1] NCHW tensor or an iterable of batches) for training-time
    hooks: the torchmetrics backend, no progress bar. Pass ``reference`` as a :class:`ReferenceStats` built
    once with :func:`reference_statistics` and ``feature_net`` as a :class:`FeatureNet` to avoid rebuilding
    them at every call."""
    kwargs = {"backend": "torchmetrics", "progress": False, **kwargs}
    return compute_fid(images, reference, feature_net, **kwargs)
