"""Captioned data for text-to-image: the procedural captioned shapes, and prompt files.

**Captioned shapes.** One shape per image, described by three attributes: colour (red, green, blue, yellow),
shape (circle, square, triangle) and position (a quadrant: top left, top right, bottom left, bottom right), with
the caption ``"a {colour} {shape} at the {position}"``. The 48 combinations split into 40 *training* ones and 8
*held-out* ones (:data:`HELDOUT_COMBINATIONS`), chosen so that every single attribute value, and every pair of
values, still appears in training: a teacher trained on the training split and prompted with a held-out caption
has to compose attributes it never saw together. Image ``i`` is drawn from its own generator seeded by
``(seed, i)``, so any length costs no memory and every image is reproducible alone. Every image's attributes are
known, so generated images can be checked attribute by attribute (compositional accuracy).

**Prompt files** (:func:`read_prompts`, the one reader of them: training data, ``sample.py --prompts`` and the
CLIP score): one prompt per line, or ``.csv``/``.jsonl``/``.json`` records with a ``prompt`` and optionally the
image it belongs to.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fdistill.data.images import COLOURS, render_mask
from fdistill.errors import ConfigError

CAPTION_COLOURS = ("red", "green", "blue", "yellow")
CAPTION_SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28),
             "bottom left": (0.28, 0.72), "bottom right": (0.72, 0.72)}  # (x, y) of the quadrant's centre
ATTRIBUTES = {"colour": CAPTION_COLOURS, "shape": CAPTION_SHAPES, "position": tuple(POSITIONS)}
ALL_COMBINATIONS = tuple(itertools.product(range(4), range(3), range(4)))  # (colour, shape, position) indices
# eight combinations, two per colour, such that every attribute value and every pair of values stays in training
HELDOUT_COMBINATIONS = ((0, 0, 3), (1, 1, 2), (2, 2, 1), (3, 0, 0), (0, 2, 2), (1, 0, 1), (2, 1, 0), (3, 2, 3))
SPLITS = ("train", "heldout", "all")
# every word of every caption, longest first (the order a word-level BPE tokenizer needs)
CAPTION_WORDS = sorted({w for values in ATTRIBUTES.values() for v in values for w in v.split()} | {"a", "at", "the"},
                       key=lambda w: (-len(w), w))


def caption(colour: int, shape: int, position: int) -> str:
    """The caption of one combination of attribute indices."""
    return f"a {CAPTION_COLOURS[colour]} {CAPTION_SHAPES[shape]} at the {tuple(POSITIONS)[position]}"


def combinations(split: str) -> list[tuple[int, int, int]]:
    """The attribute combinations of ``split`` (``train``, ``heldout`` or ``all``), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "all":
        return list(ALL_COMBINATIONS)
    heldout = set(HELDOUT_COMBINATIONS)
    return [c for c in ALL_COMBINATIONS if (c in heldout) == (split == "heldout")]


def render_shape(colour: int, shape: int, position: int, rng: np.random.Generator, size: int) -> torch.Tensor:
    """One image ``[3, size, size]`` in [-1, 1]: the shape on black, its radius and centre jittered by ``rng``."""
    radius = rng.uniform(0.13, 0.19)
    centre = np.asarray(POSITIONS[tuple(POSITIONS)[position]]) + rng.uniform(-0.05, 0.05, size=2)
    mask = render_mask(CAPTION_SHAPES[shape], centre, radius, size)
    rgb = torch.tensor(COLOURS[CAPTION_COLOURS[colour]], dtype=torch.float32).view(3, 1, 1)
    return (mask * rgb) * 2 - 1


class CaptionedCombinations(Dataset):
    """``count`` items of ``combinations`` (attribute-index tuples), each equally likely: item ``i`` draws its
    combination and its jitter from its own generator seeded by ``(seed, i)``, so any item is reproducible alone.
    Subclasses give :meth:`caption_of` and :meth:`render` (the item's tensor from its combination and generator)."""

    channels = 3

    def __init__(self, count: int, combinations: list[tuple[int, ...]], seed: int):
        self.count, self.combinations, self.seed = count, combinations, seed

    @staticmethod
    def caption_of(*combination: int) -> str:
        raise NotImplementedError

    def render(self, combination: tuple[int, ...], rng: np.random.Generator) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.count

    def _draw(self, i: int) -> tuple[tuple[int, ...], np.random.Generator]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        return self.combinations[int(rng.integers(len(self.combinations)))], rng

    def attributes(self, i: int) -> tuple[int, ...]:
        return self._draw(i)[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        combination, rng = self._draw(i)
        return self.render(combination, rng), self.caption_of(*combination)

    @property
    def prompts(self) -> list[str]:
        """The distinct captions of these combinations."""
        return [self.caption_of(*c) for c in self.combinations]

    @property
    def items(self) -> torch.Tensor:
        """Every item, stacked, rendered on first use and kept."""
        if not hasattr(self, "_items"):
            self._items = torch.stack([self[i][0] for i in range(self.count)])
        return self._items

    @property
    def captions(self) -> list[str]:
        """Every item's caption, without rendering the items."""
        return [self.caption_of(*self.attributes(i)) for i in range(self.count)]


class CaptionedShapes(CaptionedCombinations):
    """``num_images`` captioned shapes of ``split``'s combinations, each equally likely.

    Items are ``(image [3, size, size] in [-1, 1], caption)``; :meth:`attributes` gives an item's
    (colour, shape, position) indices. ``images`` (rendered on first use) serves in-memory batching.
    """

    def __init__(self, num_images: int = 8000, size: int = 32, split: str = "train", seed: int = 0):
        super().__init__(num_images, combinations(split), seed)
        self.num_images, self.size, self.split = num_images, size, split
        self.description = f"captioned shapes ({split}, {num_images} images, {size}px, seed {seed})"

    caption_of = staticmethod(caption)

    def render(self, combination, rng) -> torch.Tensor:
        return render_shape(*combination, rng, self.size)

    @property
    def images(self) -> torch.Tensor:
        return self.items


IMAGE_COLUMNS = ("image", "file")  # the image of a prompt record; both names are read (see read_prompts)
STRUCTURED_SUFFIXES = (".csv", ".jsonl", ".json")


@dataclass
class PromptRecord:
    """One prompt of a prompt file and, when the file names one, the image that goes with it."""

    prompt: str
    image: Path | None = None


def read_prompts(path: str | Path, image_root: str | Path | None = None) -> list[PromptRecord]:
    """The prompts of a prompt file, in file order, each with the image it names (``None`` when it names none).

    Formats, by suffix:

    * ``.csv``: a header row with a ``prompt`` column and optionally an image column;
    * ``.jsonl``: one JSON object per line with ``prompt`` and optionally an image;
    * ``.json``: a list of such objects, or one object mapping image paths to prompts (``{"0.png": "a cat"}``);
    * any other suffix (``.txt``): one prompt per line; blank lines are skipped.

    The image column is ``image`` or ``file``: training prompt files have used ``image``, and the CLIP score's
    ``metadata.jsonl`` (Hugging Face's imagefolder layout) ``file``; both are read, ``image`` first. Image paths
    are relative to ``image_root``, by default the prompt file's folder. A missing file, a record without a
    prompt or a file with no prompts raises :class:`ConfigError` naming the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file not found: {path}; give a prompt file: .txt (one prompt per line), or "
                          ".csv, .jsonl or .json with a 'prompt' column")
    root = path.parent if image_root is None else Path(image_root)
    suffix = path.suffix.lower()
    if suffix not in STRUCTURED_SUFFIXES:
        records = [PromptRecord(line.strip()) for line in path.read_text().splitlines() if line.strip()]
    else:
        records = [_record(row, i, path, root) for i, row in enumerate(_rows(path, suffix))]
    if not records:
        raise ConfigError(f"prompt file {path} holds no prompts; write one prompt per line or row")
    return records


def _rows(path: Path, suffix: str) -> list:
    """The records of a structured prompt file as read, before any check."""
    try:
        if suffix == ".csv":
            with path.open(newline="") as f:
                return list(csv.DictReader(f))
        text = path.read_text()
        if suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"prompt file {path} is not valid {suffix[1:]} ({e}); fix the file") from None
    if isinstance(data, dict):
        return [{"image": image, "prompt": prompt} for image, prompt in data.items()]
    if not isinstance(data, list):
        raise ConfigError(f"prompt file {path} holds neither a list of records nor an object of image: prompt "
                          "pairs; write one of those")
    return data


def _record(row, i: int, path: Path, root: Path) -> PromptRecord:
    if not isinstance(row, dict) or row.get("prompt") is None:
        columns = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise ConfigError(f"{path}: record {i} has no 'prompt' (it has: {columns}); name the prompt column "
                          "'prompt'")
    image = next((row[key] for key in IMAGE_COLUMNS if row.get(key)), None)
    return PromptRecord(str(row["prompt"]), root / str(image) if image else None)
