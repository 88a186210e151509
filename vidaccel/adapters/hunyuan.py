"""HunyuanVideo: joint attention in dual-stream and single-stream blocks; text tokens follow the video tokens
(padded text tokens are masked out with a key-padding mask)."""

from __future__ import annotations

from ..attention.processors import HunyuanJointAttentionProcessor
from ..layout import TokenLayout
from .base import PipelineAdapter, call_argument


class HunyuanVideoAdapter(PipelineAdapter):
    family = "hunyuan"
    pipeline_classes = ("HunyuanVideoPipeline",)
    text_encoder_attributes = ("text_encoder", "text_encoder_2")

    def blocks(self, transformer):
        return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)

    def self_attention_modules(self, transformer):
        return [block.attn for block in self.blocks(transformer)]

    def make_processor(self, module, layer_index, transformer_name, attend):
        return HunyuanJointAttentionProcessor(attend, layer_index, transformer_name, self.context)

    def token_layout(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        text = call_argument(args, kwargs, "encoder_hidden_states", 2)
        batch, _, frames, height, width = hidden_states.shape
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        return TokenLayout(frames // p_t, height // p, width // p, text.shape[1], "after"), batch
