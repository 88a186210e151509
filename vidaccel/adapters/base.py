"""What vidaccel needs to know about one family of diffusers video pipelines."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..attention.processors import Attend
from ..context import StepContext
from ..layout import TokenLayout


def call_argument(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    """A forward argument whether it was passed by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


class PipelineAdapter:
    """One adapter instance per accelerated pipeline. Subclasses describe a model family."""

    family: ClassVar[str] = ""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    transformer_attributes: ClassVar[tuple[str, ...]] = ("transformer",)
    text_encoder_attributes: ClassVar[tuple[str, ...]] = ("text_encoder",)
    timestep_position: ClassVar[int] = 1  # positional index of `timestep` in the transformer's forward

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.context = StepContext()

    # -- components -------------------------------------------------------------------------------------
    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    def transformers(self) -> dict[str, torch.nn.Module]:
        """Name -> transformer, for every transformer the pipeline will call (Wan 2.2 has two experts)."""
        found = {}
        for name in self.transformer_attributes:
            module = getattr(self.pipe, name, None)
            if module is not None:
                found[name] = module
        return found

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        found = {}
        for name in self.text_encoder_attributes:
            module = getattr(self.pipe, name, None)
            if module is not None:
                found[name] = module
        return found

    def blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The transformer blocks in call order."""
        raise NotImplementedError

    def self_attention_modules(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """Self-attention modules in block order (index = layer index). Never cross-attention."""
        raise NotImplementedError

    def make_processor(self, module: torch.nn.Module, layer_index: int, transformer_name: str, attend: Attend):
        raise NotImplementedError

    # -- per call -----------------------------------------------------------------------------------------
    def token_layout(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[TokenLayout, int]:
        """(token layout, batch size) of a transformer call, from the actual input shapes."""
        raise NotImplementedError

    def timestep(self, args: tuple, kwargs: dict) -> Any:
        return call_argument(args, kwargs, "timestep", self.timestep_position)

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "pipeline": type(self.pipe).__name__,
            "transformers": {name: type(t).__name__ for name, t in self.transformers().items()},
            "layers": {name: len(self.self_attention_modules(t)) for name, t in self.transformers().items()},
        }
