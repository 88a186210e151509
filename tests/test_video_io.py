import imageio.v2 as imageio
import numpy as np
import pytest

from vidaccel.video_io import read_video, write_mp4, write_side_by_side


def smooth_video(frames, height, width, phase=0.0):
    t = np.arange(frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    red = 0.5 + 0.4 * np.sin(0.2 * x + 0.3 * t + phase) + 0 * y
    green = 0.5 + 0.4 * np.cos(0.15 * y - 0.2 * t + phase) + 0 * x
    blue = (x + y + t) / (width + height + frames) + 0 * t
    return np.stack([red, green, blue], axis=-1).astype(np.float32)


def mean_abs_error(read_back, video):
    return float(np.abs(read_back.astype(np.float32) / 255 - video).mean())


def test_mp4_round_trip(tmp_path):
    video = smooth_video(9, 48, 64)
    path = tmp_path / "video.mp4"
    write_mp4(path, video[None], fps=12)  # with a batch dimension, as diffusers returns it
    read_back = read_video(path)
    assert read_back.shape == (9, 48, 64, 3) and read_back.dtype == np.uint8
    assert mean_abs_error(read_back, video) < 0.02
    with imageio.get_reader(str(path), format="FFMPEG") as reader:
        meta = reader.get_meta_data()
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 12


def test_odd_sizes_are_padded_by_one_replicated_row_and_column(tmp_path):
    video = smooth_video(5, 33, 45)
    path = tmp_path / "odd.mp4"
    write_mp4(path, video)
    read_back = read_video(path)
    assert read_back.shape == (5, 34, 46, 3)
    assert mean_abs_error(read_back[:, :33, :45], video) < 0.025
    # the padding repeats the edge instead of adding a black border
    assert mean_abs_error(read_back[:, 33:, :45], video[:, 32:33]) < 0.04
    assert mean_abs_error(read_back[:, :33, 45:], video[:, :, 44:45]) < 0.04


def test_uint8_frames_list_is_accepted(tmp_path):
    video = np.round(smooth_video(3, 16, 16) * 255).astype(np.uint8)
    write_mp4(tmp_path / "list.mp4", list(video))
    assert read_video(tmp_path / "list.mp4").shape == (3, 16, 16, 3)


def test_side_by_side(tmp_path):
    left, right = smooth_video(6, 32, 40), smooth_video(6, 32, 24, phase=1.0)
    path = tmp_path / "side_by_side.mp4"
    write_side_by_side(path, left, right, fps=8)
    read_back = read_video(path)
    assert read_back.shape == (6, 32, 64, 3)
    assert mean_abs_error(read_back[:, :, :40], left) < 0.03
    assert mean_abs_error(read_back[:, :, 40:], right) < 0.03
    assert mean_abs_error(read_back[:, :, 40:], smooth_video(6, 32, 24)) > 0.1  # the right half is `right`


def test_side_by_side_needs_matching_frames_and_height(tmp_path):
    with pytest.raises(ValueError, match=r"\(6, 32, 40, 3\).*\(5, 32, 40, 3\)"):
        write_side_by_side(tmp_path / "x.mp4", smooth_video(6, 32, 40), smooth_video(5, 32, 40))


def test_reading_a_missing_file_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
