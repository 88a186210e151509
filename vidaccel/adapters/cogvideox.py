"""CogVideoX: joint attention with the text tokens before the video tokens; CFG runs batched in one call
(diffusers names that call's cache context "cond_uncond")."""

from __future__ import annotations

from ..attention.processors import CogVideoXJointAttentionProcessor
from ..layout import TokenLayout
from .base import PipelineAdapter, call_argument


class CogVideoXAdapter(PipelineAdapter):
    family = "cogvideox"
    pipeline_classes = ("CogVideoXPipeline",)
    timestep_position = 2

    def blocks(self, transformer):
        return list(transformer.transformer_blocks)

    def self_attention_modules(self, transformer):
        return [block.attn1 for block in transformer.transformer_blocks]

    def make_processor(self, module, layer_index, transformer_name, attend):
        return CogVideoXJointAttentionProcessor(attend, layer_index, transformer_name, self.context)

    def token_layout(self, transformer, args, kwargs):
        hidden_states = call_argument(args, kwargs, "hidden_states", 0)
        text = call_argument(args, kwargs, "encoder_hidden_states", 1)
        batch, frames, _, height, width = hidden_states.shape
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t or 1
        return TokenLayout(frames // p_t, height // p, width // p, text.shape[1], "before"), batch
