"""The contract every acceleration method follows.

A method is configured by a frozen dataclass (validated in ``__post_init__``) and built into a small stateful
object that installs itself on a pipeline through its adapter and removes itself without a trace.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .adapters.base import PipelineAdapter


class AccelMethod(abc.ABC):
    """An installed acceleration method. One instance serves one pipeline."""

    @abc.abstractmethod
    def install(self, adapter: "PipelineAdapter") -> None:
        """Attach to the pipeline the adapter describes (processors, hooks, module swaps)."""

    @abc.abstractmethod
    def uninstall(self) -> None:
        """Restore every object ``install`` touched to the exact original. Must be safe to call twice."""

    def stats(self) -> dict[str, Any]:
        """What the method did so far (JSON-serialisable)."""
        return {}


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of all method configs. ``role`` is one of "attention", "cache", "text_encoder"."""

    role: ClassVar[str] = ""
    name: ClassVar[str] = ""

    def build(self) -> AccelMethod:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["method"] = self.name
        return data
