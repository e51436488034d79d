"""Image data sets that work offline: real digits, procedural shapes, and a user's image folder.

All return ``(image[C, H, W] float32 in [-1, 1], label int)``, the range diffusion teachers are trained on,
and expose ``num_classes``, ``channels`` and ``size`` so a run can build its networks from the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fdistill.containers import Batch

DIGITS_SPLIT_SEED = 0  # fixed, so the classifier's held-out split never leaks into its training split
DIGITS_TEST_FRACTION = 0.2
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class DigitsDataset(Dataset):
    """scikit-learn's 1797 real handwritten digits (UCI optical digits), 8x8 upsampled bilinearly.

    The only real image set available offline; 16x16 gives UNets two clean downsamplings. ``split`` selects
    a fixed, class-stratified 80/20 train/test partition (``"all"`` is the union) so metrics computed on
    ``"test"`` are held out from the feature network's training.
    """

    num_classes, channels = 10, 1

    def __init__(self, split: str = "all", size: int = 16):
        from sklearn.datasets import load_digits

        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        digits = load_digits()
        index = _digits_split(digits.target, split)
        pixels = torch.from_numpy(digits.images[index]).float().unsqueeze(1) / 16.0  # levels 0..16 -> [0, 1]
        if size != 8:
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
        self.size = size
        self.description = f"digits (scikit-learn, split={split})"  # how evaluation protocols name this set
        self.images = (pixels * 2 - 1).clamp(-1, 1).contiguous()
        self.labels = torch.from_numpy(digits.target[index]).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def _digits_split(targets: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split``: per class, a seeded permutation whose first 20% is the test part."""
    if split == "all":
        return np.arange(len(targets))
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    chosen = []
    for c in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == c))
        n_test = int(round(DIGITS_TEST_FRACTION * len(members)))
        chosen.append(members[:n_test] if split == "test" else members[n_test:])
    return np.sort(np.concatenate(chosen))


SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (1.0, 0.2, 0.2),
    "green": (0.2, 0.9, 0.3),
    "blue": (0.25, 0.4, 1.0),
    "yellow": (1.0, 0.9, 0.2),
}


class ShapesDataset(Dataset):
    """Procedural RGB shapes; class = (shape, colour), so K = len(shapes) * len(colours) equally likely modes.

    A data set with known, countable modes: mode coverage of a generator can be read off a classifier or the
    labels. Image ``i`` is drawn from its own generator seeded by ``(seed, i)``, so any length costs no
    memory and every image is reproducible on its own. Edges are anti-aliased by 4x supersampling.
    """

    channels = 3

    def __init__(
        self,
        num_images: int = 10000,
        size: int = 16,
        shapes=SHAPES,
        colours=("red", "green", "blue"),
        seed: int = 0,
    ):
        unknown = [s for s in shapes if s not in SHAPES] + [c for c in colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"unknown shapes/colours {unknown}; choose from {SHAPES} and {tuple(COLOURS)}")
        self.num_images, self.size, self.seed = num_images, size, seed
        self.classes = [(s, c) for s in shapes for c in colours]
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return self.num_images

    @cached_property
    def labels(self) -> torch.Tensor:
        """Every image's class, drawn as ``__getitem__`` draws it, without rendering the images."""
        return torch.tensor([int(np.random.default_rng([self.seed, i]).integers(self.num_classes))
                             for i in range(self.num_images)], dtype=torch.long)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.num_images:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        label = int(rng.integers(self.num_classes))
        shape, colour = self.classes[label]
        radius = rng.uniform(0.22, 0.36)  # half-size, as a fraction of the image side
        centre = rng.uniform(radius, 1 - radius, size=2)
        mask = render_mask(shape, centre, radius, self.size)
        rgb = torch.tensor(COLOURS[colour], dtype=torch.float32).view(3, 1, 1)
        return (mask * rgb) * 2 - 1, label


def render_mask(
    shape: str, centre: np.ndarray, radius: float, size: int, supersample: int = 4
) -> torch.Tensor:
    """Coverage of ``shape`` in each pixel, in [0, 1], shaped [1, size, size]."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / n
    y, x = np.meshgrid(coords - centre[1], coords - centre[0], indexing="ij")
    if shape == "circle":
        inside = x**2 + y**2 <= radius**2
    elif shape == "square":
        inside = (np.abs(x) <= radius * 0.85) & (np.abs(y) <= radius * 0.85)
    else:  # upward triangle inscribed in the circle of ``radius``: three half-planes
        base, apex = radius * 0.5, -radius
        inside = (y <= base) & (np.sqrt(3) * x - y <= -apex) & (-np.sqrt(3) * x - y <= -apex)
    coverage = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3), dtype=np.float32)
    return torch.from_numpy(coverage)[None]


class ImageFolderDataset(Dataset):
    """PNG/JPEG files under ``root``, centre-cropped to a square and resized to ``size``.

    Sub-folders of ``root`` are classes (sorted names -> labels 0..K-1); files directly in ``root`` with no
    sub-folders make an unlabelled set (``classes == []``, every label 0), as for an unconditional teacher.
    """

    def __init__(self, root: str | Path, size: int = 32, channels: int = 3):
        self.root, self.size, self.channels = Path(root), size, channels
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist; set root to a folder of PNG/JPEG files"
            )
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and _images_in(p))
        self.classes = [p.name for p in subdirs]
        self.num_classes = len(self.classes)
        groups = [(label, _images_in(p)) for label, p in enumerate(subdirs)] or [(0, _images_in(self.root))]
        self.files = [(f, label) for label, files in groups for f in files]
        if not self.files:
            raise ValueError(
                f"image folder {self.root} holds no {'/'.join(IMAGE_EXTENSIONS)} files; add images "
                "(optionally in one sub-folder per class)"
            )

    def __len__(self) -> int:
        return len(self.files)

    @cached_property
    def labels(self) -> torch.Tensor:
        """Every file's class, without loading the images."""
        return torch.tensor([label for _, label in self.files], dtype=torch.long)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[i]
        return load_image(path, self.size, self.channels), label


def load_image(path: str | Path, size: int, channels: int = 3) -> torch.Tensor:
    """An image file centre-cropped to a square and resized to ``size`` (bicubic), ``[C, size, size]`` in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB" if channels == 3 else "L")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()) / 127.5 - 1
    return (pixels[None] if channels == 1 else pixels.permute(2, 0, 1)).contiguous()


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


IMAGE_DATASETS = {"digits": DigitsDataset, "shapes": ShapesDataset, "folder": ImageFolderDataset}


def reference_images(spec):
    """An evaluation reference as ``fdistill.metrics`` takes it: the name ``digits`` becomes all 1797 digits
    (a data set with ``images`` and ``description``); folders, ``.npz`` files and tensors pass through."""
    return DigitsDataset(split="all") if isinstance(spec, str) and spec == "digits" else spec


def build_image_dataset(name: str, **kwargs) -> Dataset:
    """The data set called ``name`` (``digits``, ``shapes`` or ``folder``), built with ``kwargs``."""
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image data set {name!r}; choose one of {', '.join(IMAGE_DATASETS)}")
    return IMAGE_DATASETS[name](**kwargs)


class ImageBatches:
    """An endless stream of training batches from an image data set: real images when the objective needs
    them, and the same images' class labels as the condition of a class-conditional teacher (so the student
    learns every class in the data's proportions).

    ``class_frequencies`` (one weight per class, normalised here) draws each image's class from these
    frequencies and then the image uniformly within its class; by default images are drawn uniformly, so classes
    come in the data's own proportions. ``null_label`` makes the run unconditional for a class-conditional
    teacher: every condition is that label (the teacher's null class) whatever the image's class.

    Indices are drawn from torch's global RNG, which the trainer seeds from ``(run.seed, step)`` before each
    batch: a resumed run sees the same batches without saving any state.
    """

    def __init__(self, dataset: Dataset, batch_size: int, with_real: bool = True, conditional: bool = True,
                 class_frequencies: Sequence[float] | None = None, null_label: int | None = None):
        self.dataset, self.batch_size = dataset, batch_size
        self.with_real, self.conditional, self.null_label = with_real, conditional, null_label
        self.class_frequencies = None
        if class_frequencies is not None:
            self.class_frequencies = normalised_frequencies(class_frequencies, dataset.num_classes)
            labels = dataset.labels
            self.members = torch.sort(labels, stable=True).indices  # indices grouped by class, classes in order
            self.class_sizes = torch.bincount(labels, minlength=dataset.num_classes)
            self.class_starts = torch.cumsum(self.class_sizes, 0) - self.class_sizes
            empty = [c for c, f in enumerate(self.class_frequencies.tolist()) if f > 0 and not self.class_sizes[c]]
            if empty:
                raise ValueError(f"class frequencies give class {empty[0]} a positive share but the data hold no "
                                 "image of it; set its frequency to 0 or add images")

    def _items(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self.dataset, "images"):  # in-memory sets: one gather
            return self.dataset.images[index], self.dataset.labels[index]
        pairs = [self.dataset[int(i)] for i in index]
        return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs], dtype=torch.long)

    def _index(self) -> torch.Tensor:
        """``batch_size`` data-set indices: uniform, or a class from the class frequencies and then a member."""
        if self.class_frequencies is None:
            return torch.randint(len(self.dataset), (self.batch_size,))
        classes = torch.multinomial(self.class_frequencies, self.batch_size, replacement=True)
        sizes = self.class_sizes[classes]
        within = torch.minimum((torch.rand(self.batch_size, dtype=torch.float64) * sizes).long(), sizes - 1)
        return self.members[self.class_starts[classes] + within]

    def __iter__(self):
        while True:
            images, labels = self._items(self._index())
            if self.null_label is not None:
                labels = torch.full_like(labels, self.null_label)
            yield Batch(size=self.batch_size, real=images if self.with_real else None,
                        cond=labels if self.conditional else None)


def normalised_frequencies(weights: Sequence[float], num_classes: int) -> torch.Tensor:
    """``weights`` (one non-negative number per class, not all zero) divided by their sum, in float64."""
    f = torch.as_tensor(list(weights), dtype=torch.float64)
    if f.ndim != 1 or len(f) != num_classes:
        raise ValueError(f"{len(f.reshape(-1))} class frequencies for {num_classes} classes; give one per class")
    if not torch.isfinite(f).all() or (f < 0).any() or f.sum() == 0:
        raise ValueError(f"class frequencies {f.tolist()} must be finite, non-negative and not all zero")
    return f / f.sum()
