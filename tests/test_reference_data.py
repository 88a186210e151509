"""The procedural clip generator: a finite caption set, a clean held-out split, determinism, and clips that show
what their captions say."""

import numpy as np
import pytest
import torch

from vidaccel.reference import data
from vidaccel.reference.evaluation import classify_object_colour, clips_to_videos


def test_caption_set_is_finite_unique_and_split_cleanly():
    scenes = data.all_scenes()
    captions = [scene.caption for scene in scenes]
    assert len(set(captions)) == len(captions) > 5000
    held_out = set(data.held_out_triples())
    assert len(held_out) >= 20
    training = data.training_scenes()
    assert not {scene.triple for scene in training} & held_out
    evaluation = data.evaluation_scenes()
    assert len(evaluation) >= 20
    assert {scene.triple for scene in evaluation} == held_out
    training_captions = {scene.caption for scene in training}
    assert not training_captions & {scene.caption for scene in evaluation}
    # Every word of the vocabulary still appears in training: the held-out captions are new combinations only.
    for colour, shape, motion in held_out:
        assert any(s.colour == colour for s in training) and any(s.shape == shape for s in training)
        assert any(s.motion == motion for s in training)


def test_caption_text():
    scene = data.Scene("red", "circle", "moves left", "blue")
    assert scene.caption == "a red circle moves left over a blue background"
    panned = data.Scene("cyan", "square", "rotates", "gray", "striped", "pans right")
    assert panned.caption == "a cyan square rotates over a striped gray background as the camera pans right"


@pytest.mark.parametrize(
    "fields",
    [
        dict(colour="red", shape="circle", motion="moves left", background="red"),
        dict(colour="red", shape="circle", motion="rotates", background="blue"),
        dict(colour="red", shape="square", motion="grows", background="blue", texture="plain", camera="pans left"),
        dict(colour="purple", shape="square", motion="grows", background="blue"),
    ],
)
def test_scenes_whose_caption_would_lie_are_rejected(fields):
    with pytest.raises(ValueError):
        data.Scene(**fields)


def test_sampling_and_rendering_are_deterministic():
    assert data.sample_scenes(6, seed=3) == data.sample_scenes(6, seed=3)
    assert data.sample_scenes(6, seed=3) != data.sample_scenes(6, seed=4)
    scenes = data.sample_scenes(3, seed=5)
    first = data.render_clips(scenes, seed=11, num_frames=9, height=48, width=64)
    second = data.render_clips(scenes, seed=11, num_frames=9, height=48, width=64)
    other = data.render_clips(scenes, seed=12, num_frames=9, height=48, width=64)
    assert first.shape == (3, 3, 9, 48, 64)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert first.min() >= -1.0 and first.max() <= 1.0


def _object_masks(clip: torch.Tensor, scene: data.Scene) -> np.ndarray:
    """Pixels close to the object's colour, per frame (plain backgrounds only)."""
    rgb = (clip.permute(1, 2, 3, 0).numpy() + 1) / 2  # (F, H, W, 3)
    colour = np.array(data.OBJECT_COLOURS[scene.colour])
    return np.linalg.norm(rgb - colour, axis=-1) < 0.2


@pytest.mark.parametrize(
    "motion, axis, sign",
    [
        ("moves left", 1, -1),
        ("moves right", 1, 1),
        ("moves up", 0, -1),
        ("moves down", 0, 1),
    ],
)
def test_linear_motion_goes_where_the_caption_says(motion, axis, sign):
    scenes = [data.Scene(colour, "square", motion, "black") for colour in ("red", "green", "blue")]
    clips = data.render_clips(scenes, seed=21, num_frames=9, height=64, width=64)
    for clip, scene in zip(clips, scenes):
        masks = _object_masks(clip, scene)
        centroids = [np.argwhere(mask).mean(axis=0)[axis] for mask in masks]
        assert sign * (centroids[-1] - centroids[0]) > 8  # pixels, of 64


@pytest.mark.parametrize("motion, sign", [("grows", 1), ("shrinks", -1)])
def test_size_changes_as_captioned(motion, sign):
    scenes = [data.Scene("yellow", shape, motion, "gray") for shape in data.SHAPES]
    clips = data.render_clips(scenes, seed=22, num_frames=9, height=64, width=64)
    for clip, scene in zip(clips, scenes):
        areas = _object_masks(clip, scene).sum(axis=(1, 2))
        assert sign * (areas[-1] - areas[0]) > 0.3 * areas.max()


def test_rotation_and_pan_change_the_frames():
    rotating = data.Scene("magenta", "triangle", "rotates", "black")
    panned = data.Scene("red", "circle", "grows", "blue", "striped", "pans left")
    clips = data.render_clips([rotating, panned], seed=23, num_frames=9, height=64, width=64)
    mask = _object_masks(clips[0], rotating)
    assert abs(int(mask[0].sum()) - int(mask[-1].sum())) < 0.15 * mask[0].sum()  # same size...
    assert (mask[0] ^ mask[-1]).sum() > 0.2 * mask[0].sum()  # ...different pose
    background = clips[1][:, :, :8, :8]  # a corner the object never reaches
    assert (background[:, 0] - background[:, -1]).abs().max() > 0.3


def test_rendered_colour_matches_caption_for_every_colour_and_background():
    scenes = [
        data.Scene(colour, shape, "bounces around", background, texture)
        for colour in data.OBJECT_COLOURS
        for background in data.BACKGROUND_COLOURS
        if background != colour
        for shape, texture in [("circle", "plain"), ("cross", "checkered")]
    ]
    clips = data.render_clips(scenes, seed=24, num_frames=5, height=96, width=96)
    predicted = [classify_object_colour(video, frame_stride=2) for video in clips_to_videos(clips)]
    assert predicted == [scene.colour for scene in scenes]


def test_same_clip_on_any_device_dtype_path():
    scenes = data.sample_scenes(2, seed=8)
    reference = data.render_clips(scenes, seed=9, num_frames=5, height=32, width=32)
    half = data.render_clips(scenes, seed=9, num_frames=5, height=32, width=32, dtype=torch.float16)
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), reference, atol=2e-3)


def test_coverage_marks_exactly_the_object_pixels():
    scenes = [data.Scene("red", "circle", "moves left", "black"), data.Scene("cyan", "square", "grows", "white")]
    clips, coverage = data.render_clips(scenes, seed=31, num_frames=9, height=64, width=64, return_coverage=True)
    assert coverage.shape == (2, 9, 64, 64) and 0.0 <= coverage.min() and coverage.max() <= 1.0
    plain = data.render_clips(scenes, seed=31, num_frames=9, height=64, width=64)
    assert torch.equal(clips, plain)  # asking for the coverage changes nothing else
    for clip, cover, scene in zip(clips, coverage, scenes):
        object_pixels = torch.from_numpy(_object_masks(clip, scene))
        assert bool((cover[object_pixels] > 0.5).all())
        assert float(cover[~object_pixels].mean()) < 0.01
