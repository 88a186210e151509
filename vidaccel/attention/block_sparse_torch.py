"""Block-sparse attention in plain PyTorch by gathering each query block's key blocks: the execution path where
Triton cannot run (CPU without the interpreter). Same semantics as `kernels.block_sparse_attention` (layout
blocks plus dense key ranges, each key counted once), and its cost does shrink with the density — unlike a
dense masked softmax — so the CPU reference model gets a real, if modest, speedup from sparsity."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..kernels._block_layout import BlockLayout, normalize_kv_ranges


def block_sparse_attention_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                                  tensor_layout: str = "bhsd",
                                  dense_kv_ranges: Optional[Sequence[tuple[int, int]]] = None,
                                  sm_scale: Optional[float] = None, return_lse: bool = False):
    if tensor_layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    elif tensor_layout != "bhsd":
        raise ValueError(f"tensor_layout must be 'bhsd' or 'bshd', got {tensor_layout!r}")
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    if (Sq, Skv) != (layout.q_len, layout.kv_len):
        raise ValueError(f"layout was built for {layout.q_len}x{layout.kv_len} tokens, got {Sq}x{Skv}")
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    bm, bn, nq, nk = layout.block_m, layout.block_n, layout.num_q_blocks, layout.num_kv_blocks
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    ranges = normalize_kv_ranges(dense_kv_ranges, Skv)

    def blocks(t: torch.Tensor, n: int, size: int) -> torch.Tensor:
        return torch.nn.functional.pad(t.to(work), (0, 0, 0, n * size - t.shape[2])).view(B, H, n, size, D)

    qb, kb, vb = blocks(q, nq, bm), blocks(k, nk, bn), blocks(v, nk, bn)
    # key tokens the block pass may use: real (not ragged padding) and outside every dense range
    usable = torch.zeros(nk * bn, dtype=torch.bool, device=q.device)
    usable[:Skv] = True
    for start, end in ranges:
        usable[start:end] = False
    usable = usable.view(nk, bn)

    groups = torch.arange(B * H, device=q.device) % layout.num_groups
    idx = layout.kv_block_indices.long()[groups].view(B, H, nq, -1)  # (B, H, nq, W)
    valid_slot = torch.arange(idx.shape[-1], device=q.device) < layout.kv_block_counts[groups].view(B, H, nq, 1)
    gather = idx.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, -1, -1, bn, D)
    k_sel = torch.gather(kb.unsqueeze(2).expand(-1, -1, nq, -1, -1, -1), 3, gather).flatten(3, 4)
    v_sel = torch.gather(vb.unsqueeze(2).expand(-1, -1, nq, -1, -1, -1), 3, gather).flatten(3, 4)
    key_ok = (usable[idx] & valid_slot.unsqueeze(-1)).flatten(3, 4)  # (B, H, nq, W*bn)

    scores = torch.matmul(qb, k_sel.transpose(-1, -2)) * scale  # (B, H, nq, bm, W*bn)
    scores = scores.masked_fill(~key_ok.unsqueeze(3), float("-inf"))
    values = v_sel
    if ranges:
        range_index = torch.cat([torch.arange(s, e, device=q.device) for s, e in ranges])
        k_range, v_range = k.to(work)[:, :, range_index], v.to(work)[:, :, range_index]
        range_scores = torch.matmul(qb, k_range.unsqueeze(2).transpose(-1, -2)) * scale  # (B, H, nq, bm, R)
        scores = torch.cat([scores, range_scores], dim=-1)
        values = torch.cat([values, v_range.unsqueeze(2).expand(-1, -1, nq, -1, -1)], dim=-2)
    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows with no key
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(work).min))
    out = torch.matmul(probs, values).flatten(2, 3)[:, :, :Sq].to(q.dtype)
    lse = lse.flatten(2, 3)[:, :, :Sq].float()
    if tensor_layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
