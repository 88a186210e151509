"""`RadialAttention`: the static O(n log n) Radial mask as a vidaccel attention method (DESIGN.md §3, §6)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..method import MethodConfig
from .radial import DEFAULT_KEEP_THRESHOLD, radial_block_layout
from .sparse_base import SparseAttentionMethod, run_block_sparse

# Per model family: (decay, attention sink). Wan: the authors' decay 0.2 with the first frame as a sink.
FAMILY_DEFAULTS = {"wan": (0.2, True), "hunyuan": (0.2, False), "cogvideox": (0.2, False)}


class RadialAttentionMethod(SparseAttentionMethod):
    def __init__(self, config: "RadialAttention"):
        super().__init__(config.dense_warmup, config.dense_layers)
        self.config = config
        self.decay = config.decay
        self.attention_sink = config.attention_sink
        self._plans: dict = {}
        self.layout_builds = 0

    def install(self, adapter) -> None:
        decay, sink = FAMILY_DEFAULTS.get(adapter.family, (0.2, False))
        self.decay = decay if self.config.decay is None else self.config.decay
        self.attention_sink = sink if self.config.attention_sink is None else self.config.attention_sink
        super().install(adapter)

    def plan_for(self, video_layout, device):
        key = (video_layout, str(device))
        plan = self._plans.get(key)
        if plan is None:  # once per shape; later calls are a dict lookup
            plan = radial_block_layout(
                video_layout, decay=self.decay, block_size=self.config.block_size,
                attention_sink=self.attention_sink, dense_near_frames=self.config.dense_near_frames,
                keep_threshold=self.config.keep_threshold, device=device,
            )
            self._plans[key] = plan
            self.layout_builds += 1
        return plan

    def sparse_video_attention(self, q, k, v, video_layout, call, need_lse):
        plan = self.plan_for(video_layout, q.device)
        result = run_block_sparse(q, k, v, plan.layout, plan.dense_kv_ranges, return_lse=need_lse)
        return result if need_lse else (result, None)

    def stats(self):
        out = super().stats()
        plans = list(self._plans.values())
        out["layout_builds"] = self.layout_builds
        out["density"] = sum(p.density for p in plans) / len(plans) if plans else None
        out["layouts"] = [p.report() for p in plans]
        return out


@dataclasses.dataclass(frozen=True)
class RadialAttention(MethodConfig):
    """Radial Attention. `dense_warmup`: a fraction (< 1) or a count of the first steps that run dense (the
    authors: 12 of 50); `dense_layers`: first layers kept dense; `decay`: band width factor (None: per-model
    default, 0.2 for Wan); `attention_sink`: every query sees the first frame (None: on for Wan)."""

    role = "attention"
    name = "radial"

    dense_warmup: float = 0.25
    dense_layers: int = 1
    decay: Optional[float] = None
    block_size: int = 128
    attention_sink: Optional[bool] = None
    dense_near_frames: int = 1
    keep_threshold: float = DEFAULT_KEEP_THRESHOLD

    def __post_init__(self):
        if self.dense_warmup < 0 or (isinstance(self.dense_warmup, float) and self.dense_warmup >= 1
                                     and not float(self.dense_warmup).is_integer()):
            raise ValueError(f"dense_warmup must be a fraction in [0, 1) or a step count, got {self.dense_warmup}")
        if self.dense_layers < 0:
            raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")
        if self.decay is not None and not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.block_size not in (64, 128):
            raise ValueError(f"block_size must be 64 or 128, got {self.block_size}")
        if self.dense_near_frames < 0:
            raise ValueError(f"dense_near_frames must be >= 0, got {self.dense_near_frames}")

    def build(self) -> RadialAttentionMethod:
        return RadialAttentionMethod(self)
