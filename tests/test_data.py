"""Image data sets: shapes, ranges, labels, determinism, and the image-folder round trip."""

import numpy as np
import pytest
import torch
from PIL import Image

from fdistill.data import DigitsDataset, ImageFolderDataset, ShapesDataset, build_image_dataset
from fdistill.data.images import _digits_split


def test_digits_shapes_range_and_labels():
    data = DigitsDataset("all")
    image, label = data[0]
    assert len(data) == 1797 and image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert data.images.min() == -1 and data.images.max() == 1
    assert isinstance(label, int) and torch.bincount(data.labels).min() >= 170  # 10 balanced classes


def test_digits_split_is_fixed_disjoint_and_stratified():
    targets = DigitsDataset("all").labels.numpy()
    train, test = _digits_split(targets, "train"), _digits_split(targets, "test")
    assert len(train) + len(test) == 1797 and not set(train) & set(test)
    assert np.array_equal(_digits_split(targets, "test"), test)
    held_out = DigitsDataset("test")
    assert torch.equal(held_out.labels, torch.from_numpy(targets[test]))
    assert torch.bincount(held_out.labels).min() >= 35  # every class held out at about 20%


def test_shapes_are_deterministic_rgb_in_range():
    data = ShapesDataset(num_images=50, size=32, seed=3)
    image, label = data[7]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and image.max() > 0  # a shape was drawn on the background
    assert torch.equal(ShapesDataset(num_images=50, size=32, seed=3)[7][0], image)
    assert not torch.equal(ShapesDataset(num_images=50, size=32, seed=4)[7][0], image)
    labels = {data[i][1] for i in range(50)}
    assert labels <= set(range(data.num_classes)) and len(labels) > 3
    with pytest.raises(IndexError):
        data[50]


def test_shapes_class_encodes_colour():
    data = ShapesDataset(num_images=40, shapes=("circle", "square"), colours=("red", "blue"))
    assert data.num_classes == 4
    for i in range(40):
        image, label = data[i]
        _, colour = data.classes[label]
        brightest = (image + 1).sum(dim=(1, 2)).argmax().item()
        assert brightest == {"red": 0, "blue": 2}[colour]


def test_image_folder_round_trip_with_classes(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / name / f"{i}.png"
            )
    data = build_image_dataset("folder", root=tmp_path, size=8)
    assert data.classes == ["cats", "dogs"] and len(data) == 6
    assert [data[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    image, _ = data[0]
    assert image.shape == (3, 8, 8) and image.min() >= -1 and image.max() <= 1


def test_image_folder_flat_grayscale_is_exact(tmp_path):
    pixels = np.tile(np.array([0, 255], dtype=np.uint8), (4, 2))  # 4x4 stripes, no resize needed
    Image.fromarray(pixels).save(tmp_path / "a.png")
    data = ImageFolderDataset(tmp_path, size=4, channels=1)
    image, label = data[0]
    assert data.classes == [] and label == 0
    assert torch.equal(image[0], torch.from_numpy(pixels.astype(np.float32)) / 127.5 - 1)


def test_image_folder_missing_or_empty_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="no .png"):
        ImageFolderDataset(tmp_path)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="digits, shapes, folder"):
        build_image_dataset("mnist")
