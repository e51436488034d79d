"""FD/FID, KID, precision/recall and the eval/fid.py CLI on small images and a tiny feature network (CPU)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from scipy import linalg

from fdistill.metrics import fid
from fdistill.metrics.features import DIGITS_CLASSIFIER_DIR, WEIGHTS_FILE
from fdistill.metrics.image_sources import to_uint8_nchw

ROOT = Path(__file__).resolve().parent.parent
needs_digits_classifier = pytest.mark.skipif(not (DIGITS_CLASSIFIER_DIR / WEIGHTS_FILE).is_file(),
                                             reason="digits classifier asset not built")


class TinyFeatures(nn.Module):
    """A fixed random conv net: enough structure to tell image sets apart, milliseconds per batch."""

    def __init__(self, seed: int = 0, dim: int = 12):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8 * 4 * 4, dim)

    def forward(self, x):
        return self.proj(nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4).flatten(1))


def _images(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, 3, 16, 16, generator=gen) * 2 - 1) * scale).clamp(-1, 1)


def _direct_fd(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


def _save_folder(images: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_uint8_nchw(images).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture
def net():
    return fid.FeatureNet(TinyFeatures(), input_size=16)


@pytest.fixture
def sets():
    return _images(200, 0), _images(200, 1, scale=0.6)


def test_frechet_distance_formula():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(500, 6)), rng.normal(0.3, 1.5, size=(400, 6))
    mu1, s1 = fid.feature_statistics(f1)
    mu2, s2 = fid.feature_statistics(f2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_direct_fd(f1, f2), rel=1e-10)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    singular = np.zeros((6, 6))  # rank-0 covariance takes the eps-regularised branch
    assert np.isfinite(fid.frechet_distance(mu1, singular, mu2, singular))


def test_fd_of_a_set_with_itself_is_zero(net, sets):
    result = fid.compute_fid(sets[0], sets[0], net, progress=False)
    assert abs(result["value"]) < 1e-6


def test_fd_equals_direct_computation_on_the_same_features(net, sets):
    real, fake = sets
    f_real, f_fake = (net(to_uint8_nchw(x)).double().numpy() for x in (real, fake))
    for backend in ("clean", "torchmetrics"):
        result = fid.compute_fid(fake, real, net, backend, progress=False, seeds=[0, 1], steps=1)
        assert result["value"] == pytest.approx(_direct_fd(f_fake, f_real), rel=1e-6)
    assert result["value"] > 1e-3
    assert result["metric"] == "FD" and result["proxy"] is True
    protocol = (result["num_samples"], result["num_reference"], result["seeds"], result["steps"])
    assert protocol == (200, 200, [0, 1], 1)
    assert (result["feature_net"], result["weights_hash"]) == ("TinyFeatures", fid.module_hash(net.net))


@pytest.mark.parametrize("backend", ["clean", "legacy_pytorch", "legacy_tensorflow"])
def test_cleanfid_folder_and_torchmetrics_in_memory_agree(net, sets, tmp_path, backend):
    real, fake = sets
    folder = _save_folder(real, tmp_path / "real")
    clean = fid.compute_fid(fake, folder, net, backend, progress=False)
    in_memory = fid.compute_fid(fake, real, net, "torchmetrics", progress=False)
    assert clean["reference"].startswith("folder")
    assert clean["value"] == pytest.approx(in_memory["value"], rel=1e-3)


def test_streamed_npz_and_tensor_sources_agree(net, sets, tmp_path):
    real, fake = sets
    expected = fid.compute_fid(fake, real, net, progress=False)["value"]
    batches = lambda: (fake[i : i + 32] for i in range(0, 200, 32))  # noqa: E731
    streamed = fid.compute_fid(batches, real, net, progress=False)
    np.savez(tmp_path / "float.npz", images=fake.numpy())
    np.savez(tmp_path / "uint8.npz", images=to_uint8_nchw(fake).permute(0, 2, 3, 1).numpy())
    assert streamed["value"] == pytest.approx(expected, rel=1e-9) and streamed["num_samples"] == 200
    for name in ("float.npz", "uint8.npz"):
        assert fid.compute_fid(tmp_path / name, real, net, progress=False)["value"] == pytest.approx(expected)


def test_reference_statistics_round_trip(net, sets, tmp_path):
    real, fake = sets
    folder = _save_folder(real, tmp_path / "real")
    stats = fid.compute_statistics(folder, net, keep_features=True, progress=False)
    fid.save_statistics(stats, tmp_path / "stats.npz")
    loaded = fid.load_statistics(tmp_path / "stats.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, stats.features)
    assert (loaded.num_samples, loaded.feature_net, loaded.weights_hash, loaded.backend) == (
        200, "TinyFeatures", net.weights_hash, "clean")
    from_file = fid.compute_fid(fake, tmp_path / "stats.npz", net, progress=False, precision_recall_k=3)
    from_folder = fid.compute_fid(fake, tmp_path / "real", net, progress=False, precision_recall_k=3)
    assert from_file["value"] == pytest.approx(from_folder["value"], rel=1e-9)
    assert (from_file["precision"], from_file["recall"]) == (from_folder["precision"], from_folder["recall"])


def test_mismatched_feature_network_is_refused(net, sets, tmp_path):
    real, fake = sets
    fid.save_statistics(fid.compute_statistics(real, net, progress=False), tmp_path / "stats.npz")
    other = fid.FeatureNet(TinyFeatures(seed=1), input_size=16)  # same name, other weights
    with pytest.raises(ValueError, match="rebuild") as err:
        fid.compute_fid(fake, tmp_path / "stats.npz", other, progress=False)
    assert "\n" not in str(err.value) and net.weights_hash in str(err.value)


def test_kid_and_precision_recall_sanity():
    from fdistill.metrics.kid_pr import kernel_inception_distance, precision_recall

    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8))
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0, "pr_k": 3}
    far = precision_recall(real, real + 100.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    same = kernel_inception_distance(real, rng.normal(size=(300, 8)), subsets=20, subset_size=100)
    shifted = kernel_inception_distance(real, rng.normal(2.0, size=(300, 8)), subsets=20, subset_size=100)
    assert abs(same["kid_mean"]) < 0.05 < shifted["kid_mean"]


def test_training_hook_reuses_reference_and_net(net, sets):
    real, fake = sets
    reference = fid.reference_statistics(real, net, "torchmetrics", progress=False)
    result = fid.frechet_distance_to_reference(fake, reference, net, seeds=[7])
    assert result["backend"] == "torchmetrics" and result["seeds"] == [7]
    expected = fid.compute_fid(fake, real, net, progress=False)["value"]
    assert result["value"] == pytest.approx(expected, rel=1e-6)


def test_missing_inception_weights_fail_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt") as err:
        fid.load_inception(backend="clean")
    assert time.perf_counter() - start < 1.0 and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        fid.load_inception(backend="torchmetrics")


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity installed")
def test_torch_fidelity_weights_need_their_package(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "empty"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / fid.TORCH_FIDELITY_INCEPTION).write_bytes(b"not used")
    with pytest.raises(ValueError, match="pip install torch-fidelity"):
        fid.load_inception(backend="torchmetrics")


class _FakeInceptionLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 16, 16)  # 2048-d in the real network; small keeps the test fast

    def forward(self, x):
        return self.proj(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


class _FakeTorchScriptInception(nn.Module):
    """Same interface as clean-fid's TorchScript Inception: ``layers`` at 299 px, or resize inside."""

    def __init__(self):
        super().__init__()
        self.layers = _FakeInceptionLayers()

    def forward(self, x, return_features: bool = False):
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


def test_inception_is_found_in_the_clean_fid_cache_path(tmp_path, monkeypatch, sets):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    weights = tmp_path / fid.CLEANFID_INCEPTION
    torch.jit.script(_FakeTorchScriptInception()).save(str(weights))
    real, fake = sets
    result = fid.compute_fid(fake[:20], real[:20], "inception", "torchmetrics", progress=False)
    assert (result["metric"], result["proxy"], result["feature_net"]) == ("proxy FID", True, "inception")
    assert result["weights_hash"] == fid.file_hash(weights)
    clean = fid.compute_fid(fake[:20], real[:20], "inception", "clean", progress=False)
    assert np.isfinite(clean["value"]) and clean["value"] > 0


def _load_cli(name: str):
    spec = importlib.util.spec_from_file_location(f"eval_{name}", ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    cli = _load_cli("fid")
    weights = tmp_path / "inception.pt"
    torch.jit.script(_FakeTorchScriptInception()).save(str(weights))
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 5, 16, 16), np.float32))  # float with 5 channels
    scaled = tmp_path / "scaled.npz"
    np.savez(scaled, images=np.full((4, 3, 16, 16), 255.0, np.float32))  # float, but not in [-1, 1]
    cases = {tmp_path / "missing": "not a folder", bad: "1 or 3 channels", scaled: "must be in [-1, 1]",
             tmp_path: "no images"}
    for samples, message in cases.items():
        code = cli.main(["--samples", str(samples), "--ref", "digits", "--features", "inception",
                         "--inception-weights", str(weights), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err


@pytest.mark.slow
def test_cli_process_missing_inception_is_one_line(tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "t"), "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "eval" / "fid.py"), "ref", "--data", "digits",
                           "--features", "inception", "--out", str(tmp_path / "s.npz")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: Inception weights not found") and proc.stderr.count("\n") == 1


@needs_digits_classifier
def test_cli_digits_reference_and_samples(tmp_path, capsys):
    from fdistill.data.images import DigitsDataset

    cli = _load_cli("fid")
    assert cli.main(["ref", "--data", "digits", "--out", str(tmp_path / "digits.npz"), "--keep-features",
                     "--no-progress"]) == 0
    samples = DigitsDataset(split="test").images
    np.savez(tmp_path / "samples.npz", images=samples.numpy())
    capsys.readouterr()
    assert cli.main(["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "digits.npz"),
                     "--kid", "--pr", "--json", "--no-progress", "--steps", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "FD" and result["feature_net"] == "fdistill-digits"
    assert result["num_reference"] == 1797 and result["num_samples"] == len(samples) and result["steps"] == 1
    # 359 real digits against all 1797: the small-sample bias floor of this feature space (two real halves
    # score about 26, see the teacher's provenance), far below generated noise.
    assert 0 <= result["value"] < 40 and result["precision"] > 0.5 and result["recall"] > 0.5
    stats = tmp_path / "digits.npz"
    from fdistill.data.images import DigitsDataset

    itself = fid.compute_fid(DigitsDataset(split="all"), stats, "fdistill-digits", "torchmetrics", progress=False)
    assert abs(itself["value"]) < 1e-6  # 16 px digits need no resize: clean and torchmetrics features agree
