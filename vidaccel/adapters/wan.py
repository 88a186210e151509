"""Wan 2.1 / 2.2 (text-to-video and image-to-video). Self-attention (`attn1`) is video-only; text enters through
cross-attention (`attn2`), which stays dense. Wan 2.2 has two experts, `transformer` and `transformer_2`,
switched by a boundary timestep; each gets its own hooks but both share the pipeline's step context."""

from __future__ import annotations

from ..attention.processors import WanSelfAttentionProcessor
from ..layout import TokenLayout
from .base import PipelineAdapter, call_argument


class WanAdapter(PipelineAdapter):
    family = "wan"
    pipeline_classes = ("WanPipeline", "WanImageToVideoPipeline")
    transformer_attributes = ("transformer", "transformer_2")

    def blocks(self, transformer):
        return list(transformer.blocks)

    def self_attention_modules(self, transformer):
        return [block.attn1 for block in transformer.blocks]

    def make_processor(self, module, layer_index, transformer_name, attend):
        return WanSelfAttentionProcessor(attend, layer_index, transformer_name, self.context)

    def token_layout(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = transformer.config.patch_size
        return TokenLayout(frames // p_t, height // p_h, width // p_w), batch
