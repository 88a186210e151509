"""Acceptance measurements: the colour classifier and the attention-locality probe."""

import numpy as np
import torch

from vidaccel.reference import data
from vidaccel.reference.architecture import SMOKE, build_transformer
from vidaccel.reference.evaluation import (
    AttentionLocalityProbe,
    classify_frame,
    classify_object_colour,
    clips_to_videos,
    self_attention_probabilities,
)


def test_classifier_sees_nothing_on_an_empty_background():
    frame = np.full((64, 64, 3), 0.45, dtype=np.float32)
    assert classify_frame(frame) is None
    striped = frame.copy()
    striped[:, ::8] = 0.27
    assert classify_frame(striped) is None


def test_classifier_picks_the_largest_region_not_a_speck():
    frame = np.zeros((64, 64, 3), dtype=np.float32)
    frame[10:30, 10:30] = data.OBJECT_COLOURS["green"]
    frame[50:53, 50:53] = data.OBJECT_COLOURS["red"]
    assert classify_frame(frame) == "green"


def test_classifier_on_textured_panning_clips():
    scenes = [
        data.Scene(colour, "triangle", "moves up", background, "striped", "pans right")
        for colour, background in [("red", "white"), ("cyan", "black"), ("magenta", "green"), ("yellow", "blue")]
    ]
    videos = clips_to_videos(data.render_clips(scenes, seed=4, num_frames=9, height=80, width=80))
    assert videos.shape == (4, 9, 3, 80, 80)
    assert [classify_object_colour(v) for v in videos] == [s.colour for s in scenes]


def _tiny_transformer_inputs(frames=3, size=8):
    torch.manual_seed(0)
    transformer = build_transformer(SMOKE).eval()
    latents = torch.randn(1, SMOKE.latent_channels, frames, size, size)
    context = torch.randn(1, 6, 384)
    return transformer, latents, context


def test_probe_probabilities_reproduce_the_stock_attention_output():
    transformer, latents, context = _tiny_transformer_inputs()
    attn = transformer.blocks[0].attn1
    hidden = torch.randn(1, 3 * 4 * 4, attn.to_q.in_features)
    rotary = transformer.rope(latents)
    probs = self_attention_probabilities(attn, hidden, rotary)
    value = attn.to_v(hidden).unflatten(2, (attn.heads, -1))
    mixed = torch.einsum("bhqk,bkhd->bqhd", probs, value).flatten(2)
    expected = attn(hidden, rotary_emb=rotary)
    assert torch.allclose(attn.to_out[0](mixed), expected, atol=1e-5)


def test_probe_reports_locality_against_the_uniform_baseline():
    transformer, latents, context = _tiny_transformer_inputs(frames=9)
    with torch.no_grad():
        plain = transformer(latents, torch.tensor([500.0]), context, return_dict=False)[0]
        with AttentionLocalityProbe(transformer, spatial_radius=1) as probe:
            probed = transformer(latents, torch.tensor([500.0]), context, return_dict=False)[0]
        after = transformer(latents, torch.tensor([500.0]), context, return_dict=False)[0]
    assert torch.equal(plain, probed) and torch.equal(plain, after)  # observing changes nothing, removal is clean
    summary = probe.summary()
    assert summary["grid"] == [9, 4, 4]
    assert len(summary["layers"]) == SMOKE.layers
    # Over 9 frames, frame distance <= 1 covers 3 of 9 frames (2 at the ends): 25 / 81 of a uniform map.
    assert abs(summary["uniform_within_1_frame"] - 25 / 81) < 1e-9
    for layer in summary["layers"]:
        assert len(layer["mass_within_1_frame"]) == SMOKE.heads
        for mass, window in zip(layer["mass_within_1_frame"], layer["mass_in_window"]):
            assert 0.0 <= window <= mass <= 1.0
    assert 0 < summary["uniform_in_window"] < summary["uniform_within_1_frame"]
