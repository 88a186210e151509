"""Self-attention processors that vidaccel puts in place of diffusers' own, one per model family.

Each does exactly what the stock processor does (projections, QK norms, rotary embeddings, output projection)
but hands the attention product itself to `attend(query, key, value, call)`, with q/k/v in diffusers'
(batch, tokens, heads, head_dim) layout. That single seam is where dense SDPA or a sparse kernel runs.
The diffusers attention dispatcher's backends are a closed set, so swapping the processor object per module
(and putting the original back on removal) is the one clean, per-instance injection point.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..context import StepContext


@dataclasses.dataclass
class AttentionCall:
    """What an attention method may know about one attention product."""

    layer_index: int
    transformer_name: str
    context: StepContext
    # key-padding/boolean or additive mask as the stock processor would pass it to SDPA, or None
    attn_mask: Optional[torch.Tensor] = None


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionCall], torch.Tensor]


def sdpa_bshd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PyTorch SDPA on (batch, tokens, heads, head_dim) views; PyTorch picks its fastest backend."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask
    )
    return out.transpose(1, 2)


class _VidaccelProcessor:
    """Common part: the seam and the identity of the layer it serves."""

    def __init__(self, attend: Attend, layer_index: int, transformer_name: str, context: StepContext):
        self.attend = attend
        self.layer_index = layer_index
        self.transformer_name = transformer_name
        self.context = context

    def _call(self, attn_mask: Optional[torch.Tensor] = None) -> AttentionCall:
        return AttentionCall(self.layer_index, self.transformer_name, self.context, attn_mask)


def _wan_rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanSelfAttentionProcessor(_VidaccelProcessor):
    """For `WanAttention` self-attention (`attn1`): video tokens only."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, rotary_emb=None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise RuntimeError("vidaccel's Wan processor serves self-attention only (attn1)")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)
        hidden_states = self.attend(query, key, value, self._call(attention_mask))
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class HunyuanJointAttentionProcessor(_VidaccelProcessor):
    """For HunyuanVideo's dual-stream (`add_q_proj` set) and single-stream joint attention: video tokens first,
    text tokens appended after them."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            if single_stream:
                text = encoder_hidden_states.shape[1]
                query = torch.cat([apply_rotary_emb(query[:, :-text], image_rotary_emb, sequence_dim=1),
                                   query[:, -text:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-text], image_rotary_emb, sequence_dim=1),
                                 key[:, -text:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        hidden_states = self.attend(query, key, value, self._call(attention_mask))
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :-text], hidden_states[:, -text:]
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class CogVideoXJointAttentionProcessor(_VidaccelProcessor):
    """For CogVideoX's joint attention: text tokens first, then video tokens."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        text = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        # (batch, heads, tokens, head_dim) as the stock processor computes it, so norms/rotary match exactly
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text:] = apply_rotary_emb(query[:, :, text:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text:] = apply_rotary_emb(key[:, :, text:], image_rotary_emb)
        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                          self._call(attention_mask))
        hidden_states = out.flatten(2, 3)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split([text, hidden_states.size(1) - text], dim=1)
        return hidden_states, encoder_hidden_states
