"""What every sparse attention method shares: when to stay dense (warm-up steps, first layers, shapes the kernel
cannot take), how to run a block layout on this machine, and how joint text tokens are kept dense."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch

from ..kernels_backend import use_triton_kernels
from ..layout import TokenLayout
from .base import AttentionMethod
from .block_sparse_torch import block_sparse_attention_gather
from .processors import AttentionCall, sdpa_bshd


def run_block_sparse(q, k, v, layout, dense_kv_ranges=(), return_lse=False):
    """(batch, tokens, heads, head_dim) block-sparse attention with the best path on this machine."""
    if not use_triton_kernels(q):
        return block_sparse_attention_gather(q, k, v, layout, tensor_layout="bshd",
                                             dense_kv_ranges=dense_kv_ranges, return_lse=return_lse)
    from ..kernels.block_sparse_attention import block_sparse_attention

    return block_sparse_attention(q, k, v, layout, tensor_layout="bshd", dense_kv_ranges=dense_kv_ranges,
                                  return_lse=return_lse)


def resolve_warmup(dense_warmup: float, num_steps: int) -> int:
    """Dense warm-up as a step count: a float in [0, 1) is a fraction of the run, an int >= 1 a count."""
    if isinstance(dense_warmup, float) and dense_warmup < 1:
        return int(round(dense_warmup * num_steps))
    return int(dense_warmup)


@dataclasses.dataclass
class _TextKeys:
    """Valid (non-padding) text keys of one call, per batch item."""

    lengths: tuple[int, ...]


class SparseAttentionMethod(AttentionMethod):
    """Subclasses implement `sparse_video_attention(q, k, v, video_layout, call)` for video queries over video
    keys, returning (out, lse); this class handles dense steps/layers, fallbacks and joint text tokens."""

    def __init__(self, dense_warmup: float, dense_layers: int):
        super().__init__()
        self.dense_warmup = dense_warmup
        self.dense_layers = dense_layers
        self._unsupported: dict[tuple, str] = {}
        self._text_keys_cache: tuple[int, Optional[_TextKeys]] = (-1, None)

    # -- policy -------------------------------------------------------------------------------------------
    def dense_reason(self, call: AttentionCall) -> Optional[str]:
        ctx = call.context
        if ctx.step_index < resolve_warmup(self.dense_warmup, ctx.num_steps):
            return "dense_warmup_step"
        if call.layer_index < self.dense_layers:
            return "dense_layer"
        return None

    def attend(self, query, key, value, call):
        ctx = call.context
        reason = self.dense_reason(call)
        layout: TokenLayout = ctx.layout
        shape_key = (tuple(query.shape), query.dtype, query.device.type)
        if reason is None and shape_key in self._unsupported:
            reason = "unsupported_shape"
        if reason is None and layout.total_tokens != query.shape[1]:
            reason = "unexpected_token_count"
        if reason is not None:
            self.calls[(ctx.branch, reason)] += 1
            return sdpa_bshd(query, key, value, call.attn_mask)
        try:
            out = self._sparse(query, key, value, layout, call)
        except ValueError as error:  # a shape the kernel cannot take: dense from now on, say so once
            self._unsupported[shape_key] = str(error)
            warnings.warn(f"vidaccel: sparse attention cannot run on q {tuple(query.shape)} {query.dtype} "
                          f"({error}); using dense attention for this shape", stacklevel=2)
            self.calls[(ctx.branch, "unsupported_shape")] += 1
            return sdpa_bshd(query, key, value, call.attn_mask)
        self.calls[(ctx.branch, "sparse")] += 1
        return out

    # -- joint text tokens --------------------------------------------------------------------------------
    def _sparse(self, q, k, v, layout: TokenLayout, call: AttentionCall):
        start, end = layout.video_start, layout.video_start + layout.video_tokens
        video_layout = TokenLayout(layout.frames, layout.height, layout.width)
        qv, kv, vv = q[:, start:end], k[:, start:end], v[:, start:end]
        if layout.text_tokens == 0:
            out, _ = self.sparse_video_attention(qv, kv, vv, video_layout, call, need_lse=False)
            return out
        # Video queries: sparse over video keys, merged with dense attention over the valid text keys.
        out_video, lse_video = self.sparse_video_attention(qv, kv, vv, video_layout, call, need_lse=True)
        text_start = 0 if layout.text_position == "before" else layout.video_tokens
        text = slice(text_start, text_start + layout.text_tokens)
        out_text, lse_text = self._video_over_text(qv, k[:, text], v[:, text], call)
        from ..kernels.block_sparse_attention import merge_attention_partials

        out_video, _ = merge_attention_partials(out_video, lse_video, out_text, lse_text, tensor_layout="bshd")
        # Text queries: dense over every key (few rows), with the stock padding mask.
        out_text_rows = sdpa_bshd(q[:, text], k, v, call.attn_mask)
        parts = [out_text_rows, out_video] if layout.text_position == "before" else [out_video, out_text_rows]
        return torch.cat(parts, dim=1)

    def _video_over_text(self, qv, kt, vt, call):
        lengths = self._text_lengths(call, kt.shape[1]).lengths
        outs, lses = [], []
        batch_items = [(slice(None), lengths[0])] if len(set(lengths)) == 1 else \
            [(slice(b, b + 1), n) for b, n in enumerate(lengths)]
        for items, n in batch_items:
            empty = _empty_layout(qv.shape[1], kt.shape[1], qv.device)
            out, lse = run_block_sparse(qv[items], kt[items], vt[items], empty, ((0, n),), return_lse=True)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)

    def _text_lengths(self, call: AttentionCall, text_tokens: int) -> _TextKeys:
        """Valid text keys per batch item, read from the key-padding mask once per transformer call (one host
        sync per call, not per layer: every layer of a call gets the same mask tensor)."""
        mask = call.attn_mask
        batch = call.context.batch_size
        if mask is None:
            return _TextKeys((text_tokens,) * batch)
        marker = call.context.calls
        if self._text_keys_cache[0] == marker:
            return self._text_keys_cache[1]
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
            raise ValueError(f"unsupported attention mask {tuple(mask.shape)} {mask.dtype} for sparse attention")
        layout = call.context.layout
        text_start = 0 if layout.text_position == "before" else layout.video_tokens
        text_mask = mask[:, 0, 0, text_start:text_start + text_tokens]
        if not bool(text_mask.cumprod(dim=-1).eq(text_mask).all()):
            raise ValueError("text padding mask is not a prefix mask")
        keys = _TextKeys(tuple(int(n) for n in text_mask.sum(-1).tolist()))
        self._text_keys_cache = (marker, keys)
        return keys

    def sparse_video_attention(self, q, k, v, video_layout: TokenLayout, call: AttentionCall, need_lse: bool):
        raise NotImplementedError

    def stats(self):
        out = super().stats()
        sparse = sum(n for (branch, kind), n in self.calls.items() if kind == "sparse")
        total = sum(self.calls.values())
        out["sparse_fraction_of_calls"] = sparse / total if total else 0.0
        if self._unsupported:
            out["unsupported_shapes"] = {str(k): v for k, v in self._unsupported.items()}
        return out


_EMPTY_LAYOUTS: dict[tuple, object] = {}


def _empty_layout(q_len: int, kv_len: int, device: torch.device):
    """A layout that visits no block: with a dense key range it computes attention over that range only."""
    from ..kernels._block_layout import BlockLayout

    key = (q_len, kv_len, str(device))
    if key not in _EMPTY_LAYOUTS:
        nq, nk = -(-q_len // 128), -(-kv_len // 128)
        _EMPTY_LAYOUTS[key] = BlockLayout.from_block_mask(torch.zeros(1, nq, nk, dtype=torch.bool, device=device),
                                                          128, q_len=q_len, kv_len=kv_len)
    return _EMPTY_LAYOUTS[key]
