import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from vidaccel import metrics
from vidaccel.metrics import (
    as_video_array,
    compare_videos,
    json_safe,
    lpips_availability,
    psnr,
    relative_l1,
    ssim,
)


def smooth_video(frames=4, height=32, width=40, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    phases = rng.uniform(0, 2 * np.pi, size=3)
    channels = [0.5 + 0.3 * np.sin(0.2 * x + 0.15 * y + 0.3 * t + phase) for phase in phases]
    return np.stack(channels, axis=-1).astype(np.float32)


def test_identical_videos_have_infinite_psnr_and_unit_ssim():
    video = smooth_video()
    assert psnr(video, video.copy()) == math.inf
    assert ssim(video, video.copy()) == pytest.approx(1.0, abs=1e-6)


def test_psnr_of_gaussian_noise_matches_analytic_value():
    rng = np.random.default_rng(1)
    sigma = 0.05
    reference = np.full((4, 64, 64, 3), 0.5, dtype=np.float32)  # mid-grey: 10 sigma from clipping
    noisy = reference + rng.normal(0.0, sigma, reference.shape).astype(np.float32)
    assert psnr(reference, noisy) == pytest.approx(10 * math.log10(1 / sigma**2), abs=0.2)
    assert psnr(reference, noisy, data_range=2.0) == pytest.approx(psnr(reference, noisy) + 20 * math.log10(2))


def test_ssim_is_the_mean_over_frames():
    reference = smooth_video(frames=3)
    test = reference.copy()
    test[0] = np.clip(test[0] + np.random.default_rng(2).normal(0, 0.1, test[0].shape), 0, 1)
    first = structural_similarity(reference[0], test[0], channel_axis=-1, data_range=1.0)
    assert first < 0.9
    assert ssim(reference, test) == pytest.approx((first + 2.0) / 3.0, abs=1e-6)


def test_input_forms_normalise_to_the_same_array():
    video = smooth_video(frames=3, height=16, width=24)
    as_uint8 = np.round(video * 255).astype(np.uint8)
    expected = as_uint8.astype(np.float32) / 255
    pil_frames = [Image.fromarray(frame) for frame in as_uint8]
    channels_first = torch.from_numpy(expected).permute(0, 3, 1, 2)[None]  # diffusers "pt": (B, F, C, H, W)

    np.testing.assert_array_equal(as_video_array(as_uint8), expected)
    np.testing.assert_array_equal(as_video_array(expected[None]), expected)
    np.testing.assert_array_equal(as_video_array(pil_frames), expected)
    np.testing.assert_array_equal(as_video_array([pil_frames]), expected)
    np.testing.assert_array_equal(as_video_array(channels_first), expected)
    np.testing.assert_array_equal(as_video_array(channels_first.to(torch.bfloat16)).shape, expected.shape)
    assert as_video_array(expected).dtype == np.float32
    assert psnr(pil_frames, expected[None]) == math.inf


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 32, 40, 3\).*\(3, 32, 40, 3\)"):
        psnr(smooth_video(frames=4), smooth_video(frames=3))
    with pytest.raises(ValueError, match=r"\(2, 16, 16, 3\).*\(2, 16, 18, 3\)"):
        ssim(smooth_video(2, 16, 16), smooth_video(2, 16, 18))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 1, 8, 8, 3), np.float32), "batch of 2"),
        (np.zeros((8, 8, 3), np.float32), "got shape"),
        (np.zeros((2, 8, 8, 4), np.float32), "3 colour channels"),
        (np.full((2, 8, 8, 3), -1.0, np.float32), r"\[0, 1\]"),
        (np.zeros((2, 8, 8, 3), np.int32), "dtype"),
        ([], "no frames"),
    ],
)
def test_invalid_videos_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        as_video_array(bad)


def test_lpips_reports_absence_here_and_compare_videos_still_works():
    available, note = lpips_availability()
    if available:
        pytest.skip(f"LPIPS backbone is present on this machine: {note}")
    assert "not" in note and ("installed" in note or "not found" in note)
    video = smooth_video()
    result = compare_videos(video, video)
    assert result["lpips"] is None and result["lpips_note"] == note
    assert result["psnr"] == math.inf and result["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_lpips_availability_looks_for_the_backbone_in_the_hub_cache(tmp_path, monkeypatch):
    # Pretend both packages are installed, so only the checkpoint decides.
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(metrics, "_alexnet_checkpoint_name", lambda: "alexnet-owt-7be5be79.pth")
    monkeypatch.setattr(metrics.torch.hub, "get_dir", lambda: str(tmp_path))
    available, note = lpips_availability()
    assert not available and str(tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth") in note

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"weights")
    available, note = lpips_availability()
    assert available and "alexnet-owt-7be5be79.pth" in note


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None if name == "lpips" else object())
    assert lpips_availability() == (False, "LPIPS not computed: the 'lpips' package is not installed")


def test_relative_l1():
    reference = torch.full((2, 3, 4), 2.0)
    assert relative_l1(reference, reference * 1.1) == pytest.approx(0.1, rel=1e-5)
    assert relative_l1(reference.to(torch.bfloat16), reference.to(torch.bfloat16)) == 0.0
    assert relative_l1(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_l1(torch.zeros(3), torch.ones(3)) == math.inf
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3\)"):
        relative_l1(reference, reference[..., 0])


def test_json_safe_round_trips_infinite_psnr():
    video = smooth_video()
    result = compare_videos(video, video)
    text = json.dumps(json_safe(result), allow_nan=False)
    loaded = json.loads(text)
    assert loaded["psnr"] == "inf" and float(loaded["psnr"]) == math.inf
    assert json_safe({"a": [np.float32(-np.inf), float("nan"), (1.5, np.int64(2))]}) == {
        "a": ["-inf", "nan", [1.5, 2]]
    }
