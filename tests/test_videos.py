"""Captioned moving shapes: layout, range, determinism, the held-out split, and that each video shows what its
caption says (colour, direction of motion) while staying inside the frame."""

import itertools

import pytest
import torch

from fdistill.data.captions import CAPTION_COLOURS
from fdistill.data.videos import (
    DIRECTIONS,
    HELDOUT_VIDEO_COMBINATIONS,
    VIDEO_ATTRIBUTES,
    VIDEO_CAPTION_WORDS,
    MovingShapes,
    video_caption,
    video_combinations,
)

SIZE, FRAMES = 32, 9


def centroids(video: torch.Tensor) -> torch.Tensor:
    """The shape's centre of mass in each frame, ``[F, 2]`` as (x, y) in pixels, from the rendered pixels alone:
    on black, the brightness above -1 is the shape's coverage times its (constant) colour."""
    weight = (video + 1).sum(dim=0)  # [F, H, W]
    rows, cols = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                                indexing="ij")
    total = weight.sum(dim=(1, 2))
    return torch.stack([(weight * cols).sum(dim=(1, 2)) / total, (weight * rows).sum(dim=(1, 2)) / total], dim=1)


def test_videos_are_channels_then_frames_rgb_in_range():
    data = MovingShapes(num_videos=12, size=SIZE, num_frames=FRAMES, seed=1)
    video, text = data[0]
    assert video.shape == (3, FRAMES, SIZE, SIZE) and video.dtype == torch.float32
    assert video.min() == -1 and video.max() <= 1 and video.max() > 0  # black background, a lit shape
    assert text == video_caption(*data.attributes(0))
    assert data.videos.shape == (12, 3, FRAMES, SIZE, SIZE)
    assert torch.equal(data.videos[5], data[5][0]) and data.captions == [data[i][1] for i in range(12)]
    assert MovingShapes(num_videos=4, size=16, num_frames=5)[3][0].shape == (3, 5, 16, 16)
    with pytest.raises(IndexError):
        data[12]


def test_videos_are_reproducible_alone_and_differ_between_items():
    video = MovingShapes(num_videos=50, seed=3)[7][0]
    assert torch.equal(MovingShapes(num_videos=8, seed=3)[7][0], video)  # item 7 needs nothing but (seed, 7)
    assert not torch.equal(MovingShapes(num_videos=50, seed=3)[8][0], video)
    assert not torch.equal(MovingShapes(num_videos=50, seed=4)[7][0], video)


def test_heldout_split_keeps_every_value_and_pair_in_training():
    train, heldout = video_combinations("train"), video_combinations("heldout")
    assert len(train) == 40 and len(heldout) == len(set(heldout)) == 8 and not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(video_combinations("all")) and len(video_combinations("all")) == 48
    assert set(heldout) == set(HELDOUT_VIDEO_COMBINATIONS)
    assert sorted(c for c, _, _ in heldout) == [0, 0, 1, 1, 2, 2, 3, 3]  # two per colour
    sizes = [len(values) for values in VIDEO_ATTRIBUTES.values()]
    for a in range(3):
        assert {c[a] for c in train} == set(range(sizes[a])), f"a value of attribute {a} is only held out"
    for a, b in itertools.combinations(range(3), 2):
        missing = set(itertools.product(range(sizes[a]), range(sizes[b]))) - {(c[a], c[b]) for c in train}
        assert not missing, f"attribute pairs ({a}, {b}) {missing} never appear in training"
        assert len({(c[a], c[b]) for c in heldout}) == 8, f"two held-out combinations share an ({a}, {b}) pair"
    for colour in range(4):  # one horizontal (left, right) and one vertical (up, down) motion held out per colour
        assert sorted(d // 2 for c, _, d in heldout if c == colour) == [0, 1]
    for shape in range(3):  # every shape held out moving along both axes
        assert {d // 2 for _, s, d in heldout if s == shape} == {0, 1}
    assert sorted(d for _, _, d in heldout) == [0, 0, 1, 1, 2, 2, 3, 3]  # every direction held out twice
    heldout_data = MovingShapes(num_videos=40, split="heldout")
    assert {heldout_data.attributes(i) for i in range(40)} <= set(heldout)
    assert sorted(heldout_data.prompts) == sorted(video_caption(*c) for c in heldout)
    with pytest.raises(ValueError, match="split"):
        video_combinations("test")


def test_caption_words_cover_every_caption():
    for combo in video_combinations("all"):
        assert set(video_caption(*combo).split()) <= set(VIDEO_CAPTION_WORDS)
    assert video_caption(3, 2, 1) == "a yellow triangle moving right"


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_shape_moves_steadily_in_the_captioned_direction(direction):
    data = MovingShapes(num_videos=200, size=SIZE, num_frames=FRAMES, split="all", seed=2)
    items = [i for i in range(len(data)) if tuple(DIRECTIONS)[data.attributes(i)[2]] == direction][:12]
    assert len(items) == 12
    dx, dy = DIRECTIONS[direction]
    axis, across = (0, 1) if dx else (1, 0)
    sign = dx or dy
    for i in items:
        video, text = data[i]
        assert text.endswith(f"moving {direction}")
        centre = centroids(video)
        steps = (centre[1:, axis] - centre[:-1, axis]) * sign
        assert steps.min() > 1.5, f"item {i}: the centre moves {steps.tolist()} px a frame towards {direction}"
        assert (centre[-1, axis] - centre[0, axis]) * sign > 14  # half of 32 px over the clip
        assert centre[:, across].max() - centre[:, across].min() < 0.05, f"item {i} drifts across its motion"
        for t in range(FRAMES - 1):  # 16 px over 8 steps: each frame is the one before shifted by 2 px exactly
            assert torch.equal(torch.roll(video[:, t], (2 * dy, 2 * dx), dims=(1, 2)), video[:, t + 1])


def test_lit_pixels_have_the_captioned_colour():
    # channels within half of the brightest one, by colour name, independent of the palette's exact values
    expected = {"red": {0}, "green": {1}, "blue": {2}, "yellow": {0, 1}}
    data = MovingShapes(num_videos=120, split="all", seed=5)
    seen = set()
    for i in range(len(data)):
        video, text = data[i]
        colour = CAPTION_COLOURS[data.attributes(i)[0]]
        assert text.startswith(f"a {colour} ")
        lit = (video + 1).sum(dim=0) > 0  # [F, H, W]
        channel_mean = torch.stack([((video[c] + 1) / 2)[lit].mean() for c in range(3)])
        dominant = {c for c in range(3) if channel_mean[c] > 0.5 * channel_mean.max()}
        assert dominant == expected[colour], f"item {i} ({text}): channel means {channel_mean.tolist()}"
        seen.add(colour)
    assert seen == set(expected)


def test_shape_stays_inside_the_frame_in_every_frame():
    for size in (SIZE, 16):
        videos = MovingShapes(num_videos=300, size=size, num_frames=FRAMES, split="all", seed=7).videos
        border = torch.cat([videos[..., 0, :], videos[..., -1, :], videos[..., :, 0], videos[..., :, -1]], dim=-1)
        assert (border == -1).all(), f"{size}px: a shape touches the border row or column"
        assert ((videos + 1).sum(dim=(1, 3, 4)) > 0).all()  # and is visible in every frame


@pytest.mark.parametrize("num_frames, temporal_factor", [(8, 4), (1, 4), (9, 3)])
def test_frame_count_must_suit_the_vae(num_frames, temporal_factor):
    with pytest.raises(ValueError, match=r"num_frames must be 1 \+ a positive multiple of temporal_factor"):
        MovingShapes(num_videos=4, num_frames=num_frames, temporal_factor=temporal_factor)
    MovingShapes(num_videos=4, num_frames=7, temporal_factor=3)  # 1 + 2 * 3 suits a factor of 3
