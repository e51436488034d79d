"""Image sources for evaluation, streamed as uint8 NCHW batches.

Conventions (every metric in ``fdistill.metrics`` follows them):

- uint8 arrays or tensors are NHWC (or NHW for grayscale), values 0..255: what PIL and ``sample.py`` write;
- floating arrays or tensors are NCHW in [-1, 1]: what a generator outputs. They are quantised to uint8
  (``round((x + 1) * 127.5)``) exactly as saving them to PNG would, so in-memory and folder evaluation agree.

A source is a folder of images, an ``.npz`` with key ``images``, a data set (any object with a ``description``
whose items are ``(image, label)`` pairs, e.g. ``fdistill.data.images.DigitsDataset``, read a chunk of items at a
time), an array/tensor, an iterable of batches, or a callable returning one. Batches are produced one at a time,
so neither a generator nor a rendered data set is ever materialised.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class ImageSource:
    """Batches of uint8 NCHW images plus what the protocol records about where they came from."""

    batches: Iterable[torch.Tensor]
    description: str
    total: int | None = None
    folder: Path | None = None


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), or a one-line error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {folder}")
    return files


def to_uint8_nchw(images) -> torch.Tensor:
    """Convert one batch (see the module conventions) to a uint8 tensor [N, C, H, W] with C in {1, 3}."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).detach().cpu()
    if x.dtype == torch.uint8:
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"uint8 images must be NHWC or NHW, 1 or 3 channels; got shape {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).contiguous()
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 NHWC or float NCHW in [-1, 1], got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"float images must be NCHW in [-1, 1], 1 or 3 channels; got shape {tuple(x.shape)}")
    if x.numel() and x.abs().max() > 2:  # a slight overshoot is clipped; [0, 255] floats are a mistake
        raise ValueError(f"float images must be in [-1, 1], got values in [{x.min():.3g}, {x.max():.3g}]")
    return ((x.double() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _chunks(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(images), batch_size):
        yield images[i : i + batch_size]


def _dataset_batches(dataset, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(dataset), batch_size):
        items = range(start, min(start + batch_size, len(dataset)))
        yield to_uint8_nchw(torch.stack([dataset[i][0] for i in items]))


def _read_rgb(file: Path) -> np.ndarray:
    with Image.open(file) as image:  # RGB, as clean-fid reads folders; gray images repeat their channel
        return np.asarray(image.convert("RGB"))


def _folder_batches(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(files), batch_size):
        arrays = [_read_rgb(f) for f in files[i : i + batch_size]]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images in {files[0].parent} differ in size {sorted(shapes)[:2]}; resize them")
        yield to_uint8_nchw(np.stack(arrays))


def load_npz_images(path: str | Path) -> np.ndarray:
    """The ``images`` array of a samples ``.npz`` (uint8 NHWC or float NCHW in [-1, 1])."""
    with np.load(path, allow_pickle=False) as data:
        if "images" not in data:
            raise ValueError(f"{path} has no 'images' array (keys: {', '.join(data.files)})")
        return data["images"]


def open_source(source, batch_size: int = 256) -> ImageSource:
    """Resolve any supported source (see module docstring) into an :class:`ImageSource`."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = list_images(path)
            return ImageSource(_folder_batches(files, batch_size), f"folder {path}", len(files), folder=path)
        if path.suffix == ".npz":
            if not path.is_file():
                raise FileNotFoundError(f"file not found: {path}")
            images = to_uint8_nchw(load_npz_images(path))
            return ImageSource(_chunks(images, batch_size), f"npz {path}", len(images))
        raise FileNotFoundError(f"not a folder or an .npz: {source}")
    if hasattr(source, "description") and hasattr(source, "__getitem__"):
        return ImageSource(_dataset_batches(source, batch_size), source.description, len(source))
    if isinstance(source, (torch.Tensor, np.ndarray)):
        images = to_uint8_nchw(source)
        return ImageSource(_chunks(images, batch_size), "in-memory images", len(images))
    if callable(source):
        source = source()
    if isinstance(source, Iterable):
        return ImageSource((to_uint8_nchw(b) for b in source), "streamed batches")
    raise TypeError(f"unsupported image source: {type(source).__name__}")
