"""Writing and reading mp4 videos (H.264, yuv420p) through imageio's ffmpeg backend.

Videos in are anything `vidaccel.metrics.as_video_array` accepts (diffusers outputs, frames lists, tensors).
yuv420p stores colour at half resolution and needs even width and height, so odd-sized videos are padded by
one replicated row/column on write: a video of odd size reads back one pixel larger in that dimension.

The mp4s are for looking at, not for measuring: yuv420p's halved chroma and limited-range conversion alone
cost a few 8-bit levels on saturated colour even at lossless x264 settings (about 34 dB PSNR on the colourful
test pattern in tests/test_video_io.py), so compute quality metrics on the pipeline's arrays.
"""

from __future__ import annotations

import os
from typing import Any

import imageio.v2 as imageio
import numpy as np

from vidaccel.metrics import as_video_array


def _to_uint8_even(video: Any) -> np.ndarray:
    frames = np.round(as_video_array(video) * 255.0).astype(np.uint8)
    pad_height, pad_width = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_height or pad_width:
        frames = np.pad(frames, ((0, 0), (0, pad_height), (0, pad_width), (0, 0)), mode="edge")
    return frames


def write_mp4(path: str | os.PathLike, video: Any, fps: int = 16, quality: float = 8.0) -> None:
    """Write `video` as an H.264/yuv420p mp4. `quality` is imageio's 1-10 scale; 8 is x264 CRF 10, whose loss
    is small next to the yuv420p conversion itself."""
    frames = _to_uint8_even(video)
    # macro_block_size=1: imageio would otherwise resize to multiples of 16; evenness is handled above.
    with imageio.get_writer(
        os.fspath(path),
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        quality=quality,
        macro_block_size=1,
    ) as writer:
        for frame in frames:
            writer.append_data(frame)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Read a video file as a uint8 array (frames, H, W, 3)."""
    with imageio.get_reader(os.fspath(path), format="FFMPEG") as reader:
        frames = [np.asarray(frame)[..., :3] for frame in reader]
    if not frames:
        raise ValueError(f"{path} contains no frames")
    return np.stack(frames)


def write_side_by_side(path: str | os.PathLike, left: Any, right: Any, fps: int = 16) -> None:
    """Write `left` and `right` next to each other in one mp4 (e.g. dense | accelerated)."""
    left_array, right_array = as_video_array(left), as_video_array(right)
    if left_array.shape[:2] != right_array.shape[:2]:
        raise ValueError(
            f"side-by-side videos need the same frame count and height: left {left_array.shape} "
            f"vs right {right_array.shape} (frames, H, W, 3)"
        )
    write_mp4(path, np.concatenate([left_array, right_array], axis=2), fps=fps)
