"""Dense attention through vidaccel's processors: the baseline of every benchmark and the proof that the
plumbing reproduces the stock pipeline."""

from __future__ import annotations

import dataclasses

from ..method import MethodConfig
from .base import AttentionMethod
from .processors import sdpa_bshd


class DenseAttentionMethod(AttentionMethod):
    def attend(self, query, key, value, call):
        self.calls[(call.context.branch, "dense")] += 1
        return sdpa_bshd(query, key, value, call.attn_mask)


@dataclasses.dataclass(frozen=True)
class DenseAttention(MethodConfig):
    """Every self-attention product with PyTorch SDPA (it picks cuDNN / FlashAttention / efficient itself)."""

    role = "attention"
    name = "dense"

    def build(self) -> DenseAttentionMethod:
        return DenseAttentionMethod()
