"""Shared machinery of attention methods: swap the self-attention processors, put the originals back."""

from __future__ import annotations

import collections
from typing import Any

import torch

from ..method import AccelMethod
from .processors import AttentionCall


class AttentionMethod(AccelMethod):
    """Installs one vidaccel processor per self-attention module; subclasses implement `attend`."""

    def __init__(self):
        self._originals: list[tuple[torch.nn.Module, Any]] = []
        self.adapter = None
        self.calls = collections.Counter()  # (branch, kind) -> attention products

    def install(self, adapter) -> None:
        self.adapter = adapter
        adapter.context.on_new_generation(self.on_new_generation)
        try:
            for name, transformer in adapter.transformers().items():
                for index, module in enumerate(adapter.self_attention_modules(transformer)):
                    processor = adapter.make_processor(module, index, name, self.attend)
                    self._originals.append((module, module.processor))
                    module.set_processor(processor)
        except Exception:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        while self._originals:
            module, original = self._originals.pop()
            module.set_processor(original)

    def on_new_generation(self, generation: int) -> None:
        """Reset per-generation state. Called by the step context before the first call of a generation."""

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               call: AttentionCall) -> torch.Tensor:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        per_branch: dict[str, dict[str, int]] = {}
        for (branch, kind), count in sorted(self.calls.items()):
            per_branch.setdefault(branch, {})[kind] = count
        return {"attention_calls": per_branch}
