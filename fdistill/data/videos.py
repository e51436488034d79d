"""Captioned moving shapes: a procedural, offline data set for text-to-video, the video sibling of
:class:`fdistill.data.captions.CaptionedShapes`.

**Content.** One shape per video, described by three attributes: colour (red, green, blue, yellow) and shape
(circle, square, triangle), the vocabularies of the captioned still shapes, and the direction it moves in (left,
right, up, down), with the caption ``"a {colour} {shape} moving {direction}"``. Colours and shapes are drawn by
:func:`fdistill.data.images.render_mask` and :data:`fdistill.data.images.COLOURS`, as the still shapes are.

**Splits.** The 48 combinations split into 40 *training* ones and 8 *held-out* ones
(:data:`HELDOUT_VIDEO_COMBINATIONS`), two per colour. No two held-out combinations share a pair of attribute values
(colour-shape, colour-direction or shape-direction), so every value and every pair of values still appears in
training, each pair at least twice; and every held-out combination keeps its other three directions in training
("a red circle moving left" is held out, the red circle moving right, up and down is not). Each colour holds out
one horizontal and one vertical motion, each direction is held out twice, and each shape in both axes. A teacher
trained on the training split and prompted with a held-out caption has to compose a motion with an appearance it
never saw moving that way.

**Frames and layout.** A video is ``[3, num_frames, size, size]`` (channels, then frames: the layout diffusers
video VAEs take), RGB in [-1, 1] on a black background. ``num_frames`` defaults to 9 and must be ``1 + k *
temporal_factor``: Wan's VAE encodes the first frame alone and then every ``temporal_factor`` (4) frames into one
latent frame, so 9 frames become 3 latent frames.

**Motion.** The shape's centre travels :data:`TRAVEL` (half the frame side) in its direction at constant speed,
from the first frame to the last: at the default 32 px and 9 frames, 2 px a frame, so consecutive frames are
exact translations of one another under the 4x supersampled anti-aliasing. Per video, the radius is drawn from
:data:`RADIUS_RANGE` (3.2 to 4.8 px at 32 px) and the start of the centre uniformly over every position that keeps
the whole shape, in every frame, at least :data:`BORDER_MARGIN` (1/16 of the side) away from the edges: along the
motion the start lies near the side the shape leaves from, across it anywhere. The margin keeps the border rows
and columns dark down to 16 px, the smallest side a Wan pipeline takes (8x VAE, 2x patches).

Video ``i`` is drawn from its own generator seeded by ``(seed, i)``, so any length costs no memory until
:attr:`MovingShapes.videos` is read and every video is reproducible alone. Every video's attributes are known, so
generated videos can be checked attribute by attribute.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from fdistill.data.captions import CAPTION_COLOURS, CAPTION_SHAPES, SPLITS, CaptionedCombinations
from fdistill.data.images import COLOURS, render_mask

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (x, y) unit step; y grows down
VIDEO_ATTRIBUTES = {"colour": CAPTION_COLOURS, "shape": CAPTION_SHAPES, "direction": tuple(DIRECTIONS)}
ALL_VIDEO_COMBINATIONS = tuple(itertools.product(range(4), range(3), range(4)))  # (colour, shape, direction)
# eight combinations, two per colour (one horizontal, one vertical motion), no two sharing a pair of values
HELDOUT_VIDEO_COMBINATIONS = ((0, 0, 0), (0, 1, 2), (1, 0, 1), (1, 1, 3), (2, 1, 0), (2, 2, 2), (3, 2, 1), (3, 0, 3))
# every word of every caption, longest first (the order a word-level BPE tokenizer needs)
VIDEO_CAPTION_WORDS = sorted({w for values in VIDEO_ATTRIBUTES.values() for v in values for w in v.split()}
                             | {"a", "moving"}, key=lambda w: (-len(w), w))
TRAVEL = 0.5  # how far the centre moves from the first frame to the last, as a fraction of the side
RADIUS_RANGE = (0.10, 0.15)  # the shape's radius (every shape lies within it), as a fraction of the side
BORDER_MARGIN = 1 / 16  # the least gap between the shape and the frame's edge, as a fraction of the side


def video_caption(colour: int, shape: int, direction: int) -> str:
    """The caption of one combination of attribute indices."""
    return f"a {CAPTION_COLOURS[colour]} {CAPTION_SHAPES[shape]} moving {tuple(DIRECTIONS)[direction]}"


def video_combinations(split: str) -> list[tuple[int, int, int]]:
    """The attribute combinations of ``split`` (``train``, ``heldout`` or ``all``), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "all":
        return list(ALL_VIDEO_COMBINATIONS)
    heldout = set(HELDOUT_VIDEO_COMBINATIONS)
    return [c for c in ALL_VIDEO_COMBINATIONS if (c in heldout) == (split == "heldout")]


def check_num_frames(num_frames: int, temporal_factor: int = 4) -> None:
    """Raise ``ValueError`` unless ``num_frames`` is ``1 + k * temporal_factor`` for some ``k >= 1``: the frame
    counts a video VAE that encodes the first frame alone and then ``temporal_factor`` frames per latent frame
    takes without padding (Wan: 5, 9, 13, ...)."""
    if temporal_factor < 1:
        raise ValueError(f"temporal_factor must be at least 1, got {temporal_factor}")
    if num_frames < 1 + temporal_factor or (num_frames - 1) % temporal_factor:
        allowed = ", ".join(str(1 + k * temporal_factor) for k in (1, 2, 3))
        raise ValueError(f"num_frames must be 1 + a positive multiple of temporal_factor ({temporal_factor}): the "
                         f"video VAE encodes the first frame alone and then {temporal_factor} frames per latent "
                         f"frame; got {num_frames}, take one of {allowed}, ...")


def render_video(colour: int, shape: int, direction: int, rng: np.random.Generator, size: int,
                 num_frames: int) -> torch.Tensor:
    """One video ``[3, num_frames, size, size]`` in [-1, 1]: the shape on black, moving :data:`TRAVEL` in
    ``direction``, its radius and start drawn from ``rng`` so that it stays :data:`BORDER_MARGIN` inside the
    frame throughout."""
    radius = rng.uniform(*RADIUS_RANGE)
    low = radius + BORDER_MARGIN  # the least coordinate the centre may take, and 1 - low the greatest
    step = np.asarray(DIRECTIONS[tuple(DIRECTIONS)[direction]], dtype=np.float64)
    along = np.abs(step)  # 1 on the axis of motion, 0 across it
    # the start's coordinate along the motion, as if moving right or down; mirrored below for left or up
    leading = rng.uniform(low, 1 - low - TRAVEL)
    across = rng.uniform(low, 1 - low)
    start = along * np.where(step > 0, leading, 1 - leading) + (1 - along) * across
    progress = np.linspace(0.0, 1.0, num_frames)
    masks = [render_mask(CAPTION_SHAPES[shape], start + TRAVEL * t * step, radius, size) for t in progress]
    rgb = torch.tensor(COLOURS[CAPTION_COLOURS[colour]], dtype=torch.float32).view(3, 1, 1, 1)
    return (torch.stack(masks, dim=1) * rgb) * 2 - 1


class MovingShapes(CaptionedCombinations):
    """``num_videos`` captioned moving shapes of ``split``'s combinations, each equally likely.

    Items are ``(video [3, num_frames, size, size] in [-1, 1], caption)``; :meth:`attributes` gives an item's
    (colour, shape, direction) indices. ``videos`` (rendered on first use) serves in-memory batching; the default
    2000 videos (50 per training combination) take 220 MB there at 32 px and 9 frames.
    ``temporal_factor`` is the video VAE's frame compression that ``num_frames`` has to suit (see
    :func:`check_num_frames`).
    """

    def __init__(self, num_videos: int = 2000, size: int = 32, num_frames: int = 9, split: str = "train",
                 seed: int = 0, temporal_factor: int = 4):
        check_num_frames(num_frames, temporal_factor)
        super().__init__(num_videos, video_combinations(split), seed)
        self.num_videos, self.size, self.num_frames, self.split = num_videos, size, num_frames, split
        self.description = (f"moving shapes ({split}, {num_videos} videos, {num_frames} frames, {size}px, "
                            f"seed {seed})")

    caption_of = staticmethod(video_caption)

    def render(self, combination, rng) -> torch.Tensor:
        return render_video(*combination, rng, self.size, self.num_frames)

    @property
    def videos(self) -> torch.Tensor:
        """Every video, ``[num_videos, 3, num_frames, size, size]``, rendered on first use and kept."""
        return self.items
