"""The shipped reference text-to-video model: a small Wan-architecture model trained on procedurally generated clips.

Quality numbers in vidaccel come from this model, never from random weights. ``reference_pipeline()`` returns a
stock ``diffusers.WanPipeline``; call it with ``GENERATION_DEFAULTS`` (33 frames at 256x256 -> 2,304 video tokens,
``max_sequence_length=64``).
"""

from .architecture import GENERATION_DEFAULTS, MAX_SEQUENCE_LENGTH, SHIPPED, ReferenceSizes
from .pipeline import reference_asset_dir, reference_pipeline

__all__ = [
    "GENERATION_DEFAULTS",
    "MAX_SEQUENCE_LENGTH",
    "SHIPPED",
    "ReferenceSizes",
    "reference_asset_dir",
    "reference_pipeline",
]
