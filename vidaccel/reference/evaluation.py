"""Acceptance measurements for the reference model: object colour of generated clips and attention locality.

``classify_object_colour`` names the colour of the moving object in a clip: it estimates the background (the one or
two most frequent colours of each frame: plain or two-tone textured), marks pixels far from it, keeps the largest
connected foreground region and maps that region's mean hue to the nearest object colour of the vocabulary.

``AttentionLocalityProbe`` records, for every self-attention layer of a Wan transformer, how much attention mass each
query puts on keys within a frame distance of 1 (and within a small spatio-temporal window), beside the fraction a
uniform attention map would put there.
"""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from .data import OBJECT_COLOURS

OBJECT_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] * 360.0 for name, rgb in OBJECT_COLOURS.items()}


def _hue_distance(a: float, b: float) -> float:
    difference = abs(a - b) % 360.0
    return min(difference, 360.0 - difference)


def _background_palette(frame: np.ndarray) -> np.ndarray:
    """One or two background colours: the most frequent quantised colours (a textured background has two tones)."""
    pixels = frame.reshape(-1, 3)
    levels = np.clip((pixels * 16).astype(np.int64), 0, 15)
    bins = levels[:, 0] * 256 + levels[:, 1] * 16 + levels[:, 2]
    counts = np.bincount(bins, minlength=4096)
    order = np.argsort(counts)[::-1]
    palette = [pixels[bins == order[0]].mean(axis=0)]
    second = pixels[bins == order[1]].mean(axis=0) if counts[order[1]] else None
    if second is not None and counts[order[1]] > 0.15 * len(pixels) and np.linalg.norm(second - palette[0]) > 0.06:
        palette.append(second)
    return np.stack(palette)


def _distance_to_background(frame: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Per-pixel distance to the background; for two tones, to the segment between them (texture edges blend)."""
    if len(palette) == 1:
        return np.linalg.norm(frame - palette[0], axis=-1)
    start, end = palette
    span = end - start
    t = np.clip(((frame - start) @ span) / float(span @ span), 0.0, 1.0)
    return np.linalg.norm(frame - (start + t[..., None] * span), axis=-1)


def classify_frame(frame: np.ndarray, threshold: float = 0.25, min_area_fraction: float = 5e-4) -> str | None:
    """Object colour in one (H, W, 3) frame with values in [0, 1]; None if no foreground region is found."""
    foreground = _distance_to_background(frame, _background_palette(frame)) > threshold
    labels, count = ndimage.label(foreground)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    if sizes[largest - 1] < min_area_fraction * foreground.size:
        return None
    mean = frame[labels == largest].mean(axis=0)
    hue, saturation, _ = colorsys.rgb_to_hsv(*mean.tolist())
    if saturation < 0.25:
        return None
    return min(OBJECT_HUES, key=lambda name: _hue_distance(hue * 360.0, OBJECT_HUES[name]))


def classify_object_colour(video: torch.Tensor | np.ndarray, frame_stride: int = 4) -> str | None:
    """Majority colour over frames of one video shaped (frames, 3, H, W) with values in [0, 1] (WanPipeline "pt")."""
    frames = video.detach().float().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video, np.float32)
    votes: dict[str, int] = {}
    for index in range(0, frames.shape[0], frame_stride):
        name = classify_frame(np.transpose(frames[index], (1, 2, 0)))
        if name is not None:
            votes[name] = votes.get(name, 0) + 1
    if not votes:
        return None
    return max(sorted(votes), key=votes.__getitem__)


def clips_to_videos(clips: torch.Tensor) -> torch.Tensor:
    """Rendered clips (B, 3, F, H, W) in [-1, 1] -> pipeline layout (B, F, 3, H, W) in [0, 1]."""
    return ((clips.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 1, 3, 4)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding; x is (B, S, heads, head_dim)."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x, dtype=torch.result_type(x, cos))
    out[..., 0::2] = real * cos - imag * sin
    out[..., 1::2] = real * sin + imag * cos
    return out.to(x.dtype)


def self_attention_probabilities(
    attn, hidden_states: torch.Tensor, rotary_emb, queries: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) of a Wan self-attention module, float32, shaped (batch, heads, queries, keys).

    Recomputes the projections the stock Wan processor makes (q/k RMS norm across heads, interleaved rotary
    embedding); ``queries`` optionally selects query rows.
    """
    query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
    query, key = _apply_rotary(query, *rotary_emb), _apply_rotary(key, *rotary_emb)
    if queries is not None:
        query = query[:, queries]
    scores = torch.einsum("bqhd,bkhd->bhqk", query.float(), key.float()) * query.shape[-1] ** -0.5
    return scores.softmax(dim=-1)


class _RecordingProcessor:
    """Runs the original processor and, beside it, measures where each query's attention mass falls."""

    def __init__(self, original: Any, probe: "AttentionLocalityProbe", layer: int) -> None:
        self.original, self.probe, self.layer = original, probe, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        if encoder_hidden_states is None and rotary_emb is not None:
            with torch.no_grad():
                self.probe._record(self.layer, attn, hidden_states, rotary_emb)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)


class AttentionLocalityProbe:
    """Attention-mass locality of every self-attention layer of a ``WanTransformer3DModel``.

    Use as a context manager around transformer calls (e.g. a whole pipeline run). ``spatial_radius`` is the
    half-width, in tokens, of the spatio-temporal window; ``query_stride`` subsamples queries to bound the cost.
    """

    def __init__(self, transformer: torch.nn.Module, spatial_radius: int = 2, query_stride: int = 1) -> None:
        self.transformer = transformer
        self.spatial_radius = spatial_radius
        self.query_stride = query_stride
        self.grid: tuple[int, int, int] | None = None
        self._sums: dict[int, dict[str, torch.Tensor]] = {}
        self._originals: list[tuple[Any, Any]] = []
        self._hook = None

    def __enter__(self) -> "AttentionLocalityProbe":
        patch = self.transformer.config.patch_size

        def remember_grid(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            _, _, frames, height, width = hidden.shape
            self.grid = (frames // patch[0], height // patch[1], width // patch[2])

        self._hook = self.transformer.register_forward_pre_hook(remember_grid, with_kwargs=True)
        for layer, block in enumerate(self.transformer.blocks):
            self._originals.append((block.attn1, block.attn1.processor))
            block.attn1.set_processor(_RecordingProcessor(block.attn1.processor, self, layer))
        return self

    def __exit__(self, *exc) -> None:
        for module, processor in self._originals:
            module.set_processor(processor)
        self._originals.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _record(self, layer: int, attn, hidden_states: torch.Tensor, rotary_emb) -> None:
        frames, height, width = self.grid
        picked = torch.arange(0, hidden_states.shape[1], self.query_stride, device=hidden_states.device)
        probs = self_attention_probabilities(attn, hidden_states, rotary_emb, picked)  # (B, heads, Q, S)

        tokens = torch.arange(hidden_states.shape[1], device=hidden_states.device)
        frame_of, row_of, col_of = tokens // (height * width), (tokens // width) % height, tokens % width
        near_frames = (frame_of[picked, None] - frame_of[None, :]).abs() <= 1
        window = (
            near_frames
            & ((row_of[picked, None] - row_of[None, :]).abs() <= self.spatial_radius)
            & ((col_of[picked, None] - col_of[None, :]).abs() <= self.spatial_radius)
        )
        sums = self._sums.setdefault(
            layer,
            {
                "temporal": torch.zeros(attn.heads, dtype=torch.float64),
                "window": torch.zeros(attn.heads, dtype=torch.float64),
                "uniform_temporal": torch.zeros((), dtype=torch.float64),
                "uniform_window": torch.zeros((), dtype=torch.float64),
                "queries": torch.zeros((), dtype=torch.float64),
            },
        )
        count = probs.shape[0] * probs.shape[2]
        sums["temporal"] += (probs * near_frames).sum(dim=(0, 2, 3)).double().cpu()
        sums["window"] += (probs * window).sum(dim=(0, 2, 3)).double().cpu()
        sums["uniform_temporal"] += near_frames.double().mean(dim=1).sum().cpu() * probs.shape[0]
        sums["uniform_window"] += window.double().mean(dim=1).sum().cpu() * probs.shape[0]
        sums["queries"] += count

    def summary(self) -> dict[str, Any]:
        """Per layer and head: mean attention mass within frame distance <= 1 and within the window, vs uniform."""
        layers = []
        for layer in sorted(self._sums):
            sums = self._sums[layer]
            queries = float(sums["queries"])
            layers.append(
                {
                    "layer": layer,
                    "mass_within_1_frame": (sums["temporal"] / queries).tolist(),
                    "uniform_within_1_frame": float(sums["uniform_temporal"]) / queries,
                    "mass_in_window": (sums["window"] / queries).tolist(),
                    "uniform_in_window": float(sums["uniform_window"]) / queries,
                }
            )
        if not layers:
            return {"layers": []}
        temporal = float(np.mean([np.mean(entry["mass_within_1_frame"]) for entry in layers]))
        window = float(np.mean([np.mean(entry["mass_in_window"]) for entry in layers]))
        return {
            "grid": list(self.grid) if self.grid else None,
            "spatial_radius": self.spatial_radius,
            "mean_mass_within_1_frame": temporal,
            "uniform_within_1_frame": layers[0]["uniform_within_1_frame"],
            "mean_mass_in_window": window,
            "uniform_in_window": layers[0]["uniform_in_window"],
            "layers": layers,
        }
