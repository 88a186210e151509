"""Quality of an accelerated video against the dense video of the same seed (DESIGN.md §4).

Every function takes videos as diffusers pipelines return them and normalises them with `as_video_array`.

PSNR of identical videos is ``float('inf')``. Python's ``json`` would write that as the non-standard token
``Infinity``; pass results through `json_safe` before writing JSON, which turns non-finite floats into the
strings ``"inf"``, ``"-inf"`` and ``"nan"`` (``float()`` parses them back).

LPIPS is reported only with the real pretrained AlexNet backbone. The `lpips` package fetches that backbone
through torchvision from the internet; where the file is not already in the torch hub cache we report
``None`` with the reason instead of downloading or falling back to random weights.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Any

import numpy as np
import torch

# torchvision's file name for AlexNet IMAGENET1K_V1, used when torchvision is not importable to ask it.
_ALEXNET_CHECKPOINT_FALLBACK = "alexnet-owt-7be5be79.pth"
# Values a little outside [0, 1] come from float rounding in VAE post-processing; more than this is a
# wrongly scaled input (e.g. [-1, 1]) that would make PSNR meaningless.
_RANGE_TOLERANCE = 1e-3


def as_video_array(video: Any) -> np.ndarray:
    """Return `video` as a float32 array (frames, H, W, 3) with values in [0, 1].

    Accepts numpy arrays and torch tensors, channels last (..., H, W, 3) or channels first (..., 3, H, W),
    with an optional batch dimension of size 1 (diffusers' ``output_type="np"``/``"pt"``); uint8 values are
    scaled by 1/255. Also accepts a list of PIL images or of (H, W, 3) frames, or a batch of one such list
    (diffusers' ``output_type="pil"``).
    """
    if isinstance(video, (list, tuple)):
        if len(video) == 1 and isinstance(video[0], (list, tuple)):
            video = video[0]
        if len(video) == 0:
            raise ValueError("video has no frames")
        video = np.stack([_frame_to_array(frame) for frame in video])
    elif isinstance(video, torch.Tensor):
        video = video.detach().to("cpu")
        if video.dtype == torch.bfloat16:  # numpy has no bfloat16
            video = video.float()
        video = video.numpy()
    array = np.asarray(video)

    if array.ndim == 5:
        if array.shape[0] != 1:
            raise ValueError(f"video batch of {array.shape[0]} videos (shape {array.shape}): select one video")
        array = array[0]
    if array.ndim != 4:
        raise ValueError(f"expected a video (frames, H, W, 3), optionally batched; got shape {array.shape}")
    if array.shape[-1] != 3 and array.shape[-3] == 3:
        array = np.moveaxis(array, -3, -1)
    if array.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels first or last; got shape {array.shape}")

    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"expected uint8 or float video values; got dtype {array.dtype}")
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
        raise ValueError(f"float video values must lie in [0, 1]; got range [{low:.4g}, {high:.4g}]")
    return np.clip(array, 0.0, 1.0)


def _frame_to_array(frame: Any) -> np.ndarray:
    if hasattr(frame, "convert"):  # a PIL image; converting drops alpha and expands greyscale
        return np.asarray(frame.convert("RGB"))
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().to("cpu").float().numpy()
    return np.asarray(frame)


def _video_pair(reference: Any, test: Any) -> tuple[np.ndarray, np.ndarray]:
    reference_array, test_array = as_video_array(reference), as_video_array(test)
    if reference_array.shape != test_array.shape:
        raise ValueError(
            f"videos differ in shape: reference {reference_array.shape} vs test {test_array.shape} "
            "(frames, H, W, 3)"
        )
    return reference_array, test_array


def psnr(reference: Any, test: Any, data_range: float = 1.0) -> float:
    """PSNR in dB over the whole video (one MSE over all frames and pixels); ``inf`` if identical."""
    reference_array, test_array = _video_pair(reference, test)
    mse = float(np.mean(np.square(reference_array - test_array), dtype=np.float64))
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(data_range**2 / mse)


def ssim(reference: Any, test: Any) -> float:
    """Mean over frames of scikit-image's SSIM (colour channels last, data range 1)."""
    from skimage.metrics import structural_similarity

    reference_array, test_array = _video_pair(reference, test)
    per_frame = [
        structural_similarity(ref_frame, test_frame, channel_axis=-1, data_range=1.0)
        for ref_frame, test_frame in zip(reference_array, test_array)
    ]
    return float(np.mean(per_frame))


def _alexnet_checkpoint_name() -> str:
    try:
        from torchvision.models import AlexNet_Weights
    except ImportError:
        return _ALEXNET_CHECKPOINT_FALLBACK
    return os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url)


def lpips_availability() -> tuple[bool, str]:
    """Whether LPIPS can run with its pretrained backbone without any download, and why not if it can't.

    Only looks for the packages and for the checkpoint file in ``torch.hub.get_dir()/checkpoints``; imports
    nothing that could start a download.
    """
    for package in ("lpips", "torchvision"):
        if importlib.util.find_spec(package) is None:
            return False, f"LPIPS not computed: the '{package}' package is not installed"
    checkpoint = os.path.join(torch.hub.get_dir(), "checkpoints", _alexnet_checkpoint_name())
    if not os.path.isfile(checkpoint) or os.path.getsize(checkpoint) == 0:
        return False, (
            f"LPIPS not computed: AlexNet backbone weights not found at {checkpoint}; lpips would download "
            "them and this machine has no internet access (copy the file there to enable LPIPS)"
        )
    return True, f"LPIPS (AlexNet backbone, v0.1 linear layers) with backbone weights from {checkpoint}"


@functools.lru_cache(maxsize=2)
def _lpips_model(device: str) -> torch.nn.Module:
    import lpips

    return lpips.LPIPS(net="alex", version="0.1", verbose=False).to(device).eval()


def lpips_distance(
    reference: Any, test: Any, device: str = "cpu", batch_frames: int = 8
) -> tuple[float | None, str]:
    """Mean over frames of LPIPS (AlexNet); ``(None, reason)`` when the pretrained backbone is unavailable."""
    available, note = lpips_availability()
    if not available:
        return None, note
    reference_array, test_array = _video_pair(reference, test)
    try:
        model = _lpips_model(device)
    except Exception as error:  # a broken install must not abort the other metrics; say what happened
        return None, f"LPIPS not computed: loading the model failed ({type(error).__name__}: {error})"

    distances = []
    with torch.no_grad():
        for start in range(0, len(reference_array), batch_frames):
            # lpips expects NCHW in [-1, 1]
            ref_batch, test_batch = (
                torch.from_numpy(array[start : start + batch_frames]).permute(0, 3, 1, 2).to(device) * 2 - 1
                for array in (reference_array, test_array)
            )
            distances.append(model(ref_batch, test_batch).flatten().cpu())
    return float(torch.cat(distances).mean()), note


def compare_videos(reference: Any, test: Any, device: str = "cpu") -> dict[str, Any]:
    """PSNR, SSIM and LPIPS of `test` against `reference`; ``lpips`` is None when it cannot be computed
    honestly and ``lpips_note`` says why (or which backbone was used). `device` is used for LPIPS only."""
    reference_array, test_array = _video_pair(reference, test)
    lpips_value, lpips_note = lpips_distance(reference_array, test_array, device=device)
    return {
        "psnr": psnr(reference_array, test_array),
        "ssim": ssim(reference_array, test_array),
        "lpips": lpips_value,
        "lpips_note": lpips_note,
    }


def relative_l1(reference: torch.Tensor, test: torch.Tensor) -> float:
    """mean |reference - test| / mean |reference|, for latents or hidden states (computed in float32)."""
    reference = torch.as_tensor(reference).float()
    test = torch.as_tensor(test).to(reference.device).float()
    if reference.shape != test.shape:
        raise ValueError(f"tensors differ in shape: reference {tuple(reference.shape)} vs test {tuple(test.shape)}")
    difference = (reference - test).abs().mean().item()
    scale = reference.abs().mean().item()
    if scale == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return difference / scale


def json_safe(value: Any) -> Any:
    """Copy of `value` (nested dicts/lists/tuples) with non-finite floats as "inf"/"-inf"/"nan" strings,
    so ``json.dumps(..., allow_nan=False)`` accepts it."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):  # numpy scalars are not JSON serialisable
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
