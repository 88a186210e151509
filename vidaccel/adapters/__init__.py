"""Model adapters: one per family of supported diffusers video pipelines."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedPipelineError
from .base import PipelineAdapter
from .cogvideox import CogVideoXAdapter
from .hunyuan import HunyuanVideoAdapter
from .wan import WanAdapter

ADAPTERS: tuple[type[PipelineAdapter], ...] = (WanAdapter, HunyuanVideoAdapter, CogVideoXAdapter)


def supported_pipelines() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.pipeline_classes]


def for_pipeline(pipe: Any) -> PipelineAdapter:
    """The adapter for `pipe`, matched on its class or a diffusers base class of it."""
    for cls in type(pipe).__mro__:
        for adapter in ADAPTERS:
            if cls.__name__ in adapter.pipeline_classes and cls.__module__.startswith("diffusers"):
                return adapter(pipe)
    raise UnsupportedPipelineError(type(pipe).__name__, supported_pipelines())


__all__ = ["PipelineAdapter", "WanAdapter", "HunyuanVideoAdapter", "CogVideoXAdapter", "for_pipeline",
           "supported_pipelines"]
