"""Block-sparse FlashAttention forward (Triton), its launch wrapper and a plain-PyTorch reference.

Semantics. Query token ``i`` of head ``(b, h)`` attends to the union of
  * every key in the key blocks that its query block visits in ``layout`` (group ``(b * heads + h) % G``), and
  * every key inside ``dense_kv_ranges`` (attention-sink frame, text tokens): ranges that every query sees.
Each key of that union is counted exactly once: the kernel handles range keys in a pass of their own and masks
them out of any layout block that overlaps a range. A query whose union is empty gets output 0 and
log-sum-exp -inf.

Kernel. FlashAttention-2 online softmax over the visited key tiles, ``exp2`` with ``log2(e)`` folded into the
score scale, fp32 accumulation. The wrapper orders each query row's key blocks once per (layout, ranges) so that
blocks needing no column mask (fully in bounds, not touching a range) come first: the hot loop carries no masks;
ragged and range-overlapping blocks run in a short masked loop after it; blocks lying wholly inside a range are
dropped. Query blocks are launched heaviest first so the grid's tail holds the light rows. On Hopper, K/V/Q/O
move through device-side tensor descriptors (TMA, exact per-head bounds); elsewhere and under
``TRITON_INTERPRET=1`` a pointer path with the same maths runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._block_layout import BlockLayout, normalize_kv_ranges

__all__ = [
    "BlockLayout",
    "SUPPORTED_HEAD_DIMS",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "merge_attention_partials",
]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MAX_DENSE_KV_RANGES = 8
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2
# `triton.jit` picks the interpreter at decoration time, so this is fixed once the module is imported.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(desc, base, start, offs_rows, offs_d, stride_s, stride_d, n_rows,
               USE_TMA: tl.constexpr, MASKED: tl.constexpr):
    """Rows [start, start + len(offs_rows)) of one head's (tokens, head_dim) matrix."""
    if USE_TMA:
        # The descriptor's shape is this head's exact extent: rows past it read as zeros.
        return desc.load([start, 0])
    else:
        ptrs = base + (start + offs_rows)[:, None] * stride_s + offs_d[None, :] * stride_d
        if MASKED:
            return tl.load(ptrs, mask=(start + offs_rows)[:, None] < n_rows, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, col_ok,
                  MASKED: tl.constexpr, IEEE_DOT: tl.constexpr):
    """One key tile of the online softmax. Scores live in the log2 domain (qk_scale includes log2(e))."""
    if IEEE_DOT:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(col_ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with no visible key so far keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE_DOT:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _block_sparse_attn_fwd(
    Q, K, V, O, LSE,
    KV_IDX, KV_CLEAN, KV_TOTAL, Q_ORDER, RANGES,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    heads, groups, q_len, kv_len, num_q_blocks, max_kv, qk_scale,
    HEAD_DIM: tl.constexpr, LAYOUT_BM: tl.constexpr, LAYOUT_BN: tl.constexpr,
    NUM_RANGES: tl.constexpr, STORE_LSE: tl.constexpr, IEEE_DOT: tl.constexpr, TMA_OK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, PREFETCH_INDEX: tl.constexpr,
):
    SUB_M: tl.constexpr = LAYOUT_BM // BLOCK_M
    SUB_N: tl.constexpr = LAYOUT_BN // BLOCK_N
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    g = bh % groups

    row = tl.load(Q_ORDER + g * num_q_blocks + tile // SUB_M)
    start_m = row * LAYOUT_BM + (tile % SUB_M) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(q_base, shape=[q_len, HEAD_DIM], strides=[stride_qs, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        k_desc = tl.make_tensor_descriptor(k_base, shape=[kv_len, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[kv_len, HEAD_DIM], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        o_desc = tl.make_tensor_descriptor(o_base, shape=[q_len, HEAD_DIM], strides=[stride_os, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
    else:
        q_desc = q_base
        k_desc = k_base
        v_desc = v_base
        o_desc = o_base

    q = _load_tile(q_desc, q_base, start_m, tl.arange(0, BLOCK_M), offs_d, stride_qs, stride_qd, q_len,
                   USE_TMA, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    all_cols = offs_n < BLOCK_N

    sched = (g * num_q_blocks + row).to(tl.int64)
    n_clean = tl.load(KV_CLEAN + sched)
    n_total = tl.load(KV_TOTAL + sched)
    idx_row = KV_IDX + sched * max_kv

    # 1) Layout blocks that are fully in bounds and outside every range: no masks at all.
    n_clean_tiles = n_clean * SUB_N
    if PREFETCH_INDEX:
        # The block index of tile it + 1 is read while tile it computes, so the K/V loads never wait on it.
        kb = tl.load(idx_row, mask=n_clean_tiles > 0, other=0)
        for it in range(0, n_clean_tiles):
            start_n = tl.multiple_of(kb * LAYOUT_BN + (it % SUB_N) * BLOCK_N, BLOCK_N)
            kb = tl.load(idx_row + (it + 1) // SUB_N, mask=it + 1 < n_clean_tiles, other=0)
            k = _load_tile(k_desc, k_base, start_n, offs_n, offs_d, stride_ks, stride_kd, kv_len, USE_TMA, False)
            v = _load_tile(v_desc, v_base, start_n, offs_n, offs_d, stride_vs, stride_vd, kv_len, USE_TMA, False)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, all_cols, False, IEEE_DOT)
    else:
        for it in range(0, n_clean_tiles):
            kb = tl.load(idx_row + it // SUB_N)
            start_n = tl.multiple_of(kb * LAYOUT_BN + (it % SUB_N) * BLOCK_N, BLOCK_N)
            k = _load_tile(k_desc, k_base, start_n, offs_n, offs_d, stride_ks, stride_kd, kv_len, USE_TMA, False)
            v = _load_tile(v_desc, v_base, start_n, offs_n, offs_d, stride_vs, stride_vd, kv_len, USE_TMA, False)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, all_cols, False, IEEE_DOT)

    # 2) Ragged last block and blocks overlapping a range: keys past kv_len or inside a range are masked out
    #    (range keys are counted by pass 3).
    for it in range(n_clean * SUB_N, n_total * SUB_N):
        kb = tl.load(idx_row + it // SUB_N)
        start_n = tl.multiple_of(kb * LAYOUT_BN + (it % SUB_N) * BLOCK_N, BLOCK_N)
        cols = start_n + offs_n
        col_ok = cols < kv_len
        for r in tl.static_range(NUM_RANGES):
            r_start = tl.load(RANGES + 2 * r)
            r_end = tl.load(RANGES + 2 * r + 1)
            col_ok = col_ok & ((cols < r_start) | (cols >= r_end))
        k = _load_tile(k_desc, k_base, start_n, offs_n, offs_d, stride_ks, stride_kd, kv_len, USE_TMA, True)
        v = _load_tile(v_desc, v_base, start_n, offs_n, offs_d, stride_vs, stride_vd, kv_len, USE_TMA, True)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, col_ok, True, IEEE_DOT)

    # 3) Dense key ranges (disjoint, inside [0, kv_len)): whole tiles unmasked, then the ragged tail.
    for r in tl.static_range(NUM_RANGES):
        r_start = tl.load(RANGES + 2 * r)
        r_end = tl.load(RANGES + 2 * r + 1)
        n_full = (r_end - r_start) // BLOCK_N
        for t in range(0, n_full):
            start_n = r_start + t * BLOCK_N
            k = _load_tile(k_desc, k_base, start_n, offs_n, offs_d, stride_ks, stride_kd, kv_len, USE_TMA, False)
            v = _load_tile(v_desc, v_base, start_n, offs_n, offs_d, stride_vs, stride_vd, kv_len, USE_TMA, False)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, all_cols, False, IEEE_DOT)
        for start_n in range(r_start + n_full * BLOCK_N, r_end, BLOCK_N):
            col_ok = (start_n + offs_n) < r_end
            k = _load_tile(k_desc, k_base, start_n, offs_n, offs_d, stride_ks, stride_kd, kv_len, USE_TMA, True)
            v = _load_tile(v_desc, v_base, start_n, offs_n, offs_d, stride_vs, stride_vd, kv_len, USE_TMA, True)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, col_ok, True, IEEE_DOT)

    # Epilogue: rows that saw no key have l_i == 0 -> output 0, lse -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if STORE_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + bh.to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)
    if USE_TMA:
        o_desc.store([start_m, 0], out.to(O.dtype.element_ty))
    else:
        o_ptrs = o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < q_len)


# ------------------------------------------------------------------------------------------------------------
# Launch configuration
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and scheduling knobs of one kernel launch."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    use_tma: bool = False
    maxnreg: Optional[int] = None  # register cap, e.g. to fit two CTAs per SM
    prefetch_index: bool = False  # read the next layout block index one tile ahead (clean loop)

    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "USE_TMA": self.use_tma,
                "PREFETCH_INDEX": self.prefetch_index}

    def launch_options(self) -> dict:
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            options["maxnreg"] = self.maxnreg
        return options

    def as_triton(self) -> triton.Config:
        return triton.Config(self.meta(), **self.launch_options())


# Autotune candidates, tuned once per (head_dim, dtype, layout block size, TMA eligibility): never per token
# count. Triton keeps both warpgroups of a CTA in lockstep (CTA-wide barriers around every TMA load), so their
# softmax and MMAs cannot overlap inside one CTA. The register-capped 128x64 tile (2 pipeline stages, 96 KB of
# shared memory, 128 registers) fits two CTAs per SM, whose independent schedules do overlap: on an H100 it
# ran Wan 480p at 0.92x cuDNN against 0.82x for the best one-CTA tile (benchmarks/results/
# attention_kernel_sweep.json). Reading the next block index one tile ahead (prefetch_index) lifted the
# 128x128 three-stage tile by 10-15% and the two-CTA tile by 1-3% on sparse layouts at Wan 480p (H100, cuDNN timed
# next to every row: 30% random blocks 3.06-3.12x, Radial 2.86-2.90x; benchmarks/results/
# radial_layout_prefetch_h100_2026-12-06.json). The pointer-path tiles serve GPUs without TMA.
_TUNING_CANDIDATES = [
    KernelConfig(128, 64, 8, 2, True, maxnreg=128, prefetch_index=True),
    KernelConfig(128, 128, 8, 3, True, prefetch_index=True),
    KernelConfig(64, 64, 4, 2, True),
    KernelConfig(128, 128, 8, 3, False),
    KernelConfig(128, 128, 8, 2, False),
    KernelConfig(64, 64, 4, 2, False),
    KernelConfig(128, 64, 8, 3, False),
]
# Small tiles only for layouts whose blocks are not multiples of 64.
_SMALL_TILE_CANDIDATES = [KernelConfig(bm, bn, 4, 2, False) for bm in (32, 16) for bn in (32, 16)]


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    fits = [c for c in configs
            if args["LAYOUT_BM"] % c.kwargs["BLOCK_M"] == 0 and args["LAYOUT_BN"] % c.kwargs["BLOCK_N"] == 0
            and (args["TMA_OK"] or not c.kwargs["USE_TMA"])]
    large = [c for c in fits if c.kwargs["BLOCK_M"] >= 64 and c.kwargs["BLOCK_N"] >= 64]
    fits = large or fits
    if args["TMA_OK"] and args["HEAD_DIM"] == 128:
        # The autotuner picks once per key, on the first call (often a dense one). At head_dim 128 on Hopper the
        # one-CTA 128x128 tiles and the pointer path only tie the two-CTA tile at full density and lose 3-10% on
        # sparse layouts (H100 2026-11-27 and 2026-12-06), so a noisy full-density tie must not pick them.
        two_cta = [c for c in fits if c.kwargs["USE_TMA"] and c.kwargs["BLOCK_N"] == 64]
        fits = two_cta or fits
    return fits


_block_sparse_attn_fwd_tuned = triton.autotune(
    configs=[c.as_triton() for c in _TUNING_CANDIDATES + _SMALL_TILE_CANDIDATES],
    key=["HEAD_DIM", "LAYOUT_BM", "LAYOUT_BN", "TMA_OK", "IEEE_DOT"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_block_sparse_attn_fwd)


def _largest_tile(block: int, cap: int = 128) -> int:
    tile = cap
    while block % tile:
        tile //= 2
    return tile


def _default_interpreter_config(layout: BlockLayout) -> KernelConfig:
    return KernelConfig(_largest_tile(layout.block_m, 64), _largest_tile(layout.block_n, 64), 4, 1, False)


def _tma_eligible(tensors_and_strides) -> bool:
    first = tensors_and_strides[0][0]
    if _INTERPRETED or not first.is_cuda or torch.cuda.get_device_capability(first.device)[0] < 9:
        return False
    if not hasattr(tl, "make_tensor_descriptor") or first.dtype not in (torch.float16, torch.bfloat16):
        return False
    for t, (sb, sh, ss, sd) in tensors_and_strides:
        elem = t.element_size()
        if sd != 1 or t.data_ptr() % 16 or any((s * elem) % 16 for s in (sb, sh, ss)):
            return False
    return True


def _ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need a small global scratch buffer per launch."""
    try:  # keep an allocator the application installed
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


# ------------------------------------------------------------------------------------------------------------
# Per-(layout, ranges) schedule
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Schedule:
    kv_indices: torch.Tensor  # int32 (G, nq, width): per row, unmasked blocks first, then masked ones
    clean_counts: torch.Tensor  # int32 (G, nq)
    total_counts: torch.Tensor  # int32 (G, nq)
    q_order: torch.Tensor  # int32 (G, nq): query blocks, heaviest first
    ranges: torch.Tensor  # int32 (max(R, 1), 2)


def _schedule(layout: BlockLayout, ranges: tuple[tuple[int, int], ...]) -> _Schedule:
    key = ("schedule", ranges)
    cached = layout._derived.get(key)
    if cached is not None:
        return cached
    dev = layout.device
    nk, bn = layout.num_kv_blocks, layout.block_n
    starts = torch.arange(nk, device=dev) * bn
    ends = torch.clamp(starts + bn, max=layout.kv_len)
    needs_mask = ends - starts < bn  # the ragged last block
    covered = torch.zeros(nk, dtype=torch.bool, device=dev)
    for r_start, r_end in ranges:
        needs_mask |= (starts < r_end) & (ends > r_start)
        covered |= (starts >= r_start) & (ends <= r_end)  # merged ranges: full cover means one range covers it
    # Sort key per entry: 0 unmasked, 1 masked, 2 dropped (padding or wholly inside a range).
    width = layout.max_kv_blocks
    idx = layout.kv_block_indices.long()
    valid = torch.arange(width, device=dev) < layout.kv_block_counts.unsqueeze(-1)
    safe_idx = torch.where(valid, idx, torch.zeros_like(idx))
    kind = torch.where(needs_mask[safe_idx], 1, 0)
    kind = torch.where(valid & ~covered[safe_idx], kind, 2)
    order = torch.argsort(kind.to(torch.int8), dim=-1, stable=True)
    kv_indices = torch.gather(safe_idx, -1, order).to(torch.int32).contiguous()
    clean = (kind == 0).sum(-1, dtype=torch.int32)
    total = (kind <= 1).sum(-1, dtype=torch.int32)
    q_order = torch.argsort(total, dim=-1, descending=True, stable=True).to(torch.int32).contiguous()
    flat = [x for span in ranges for x in span] or [0, 0]
    sched = _Schedule(kv_indices, clean.contiguous(), total.contiguous(), q_order,
                      torch.tensor(flat, dtype=torch.int32, device=dev).view(-1, 2))
    layout._derived[key] = sched
    return sched


# ------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------
def _logical_bhsd(t: torch.Tensor, tensor_layout: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(batch, heads, tokens, head_dim) sizes and strides of a tensor in either layout, without copying."""
    if tensor_layout == "bhsd":
        return tuple(t.shape), tuple(t.stride())
    b, s, h, d = t.shape
    sb, ss, sh, sd = t.stride()
    return (b, h, s, d), (sb, sh, ss, sd)


def _validate(q, k, v, layout, tensor_layout):
    if tensor_layout not in ("bhsd", "bshd"):
        raise ValueError(f"tensor_layout must be 'bhsd' or 'bshd', got {tensor_layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4D ({tensor_layout}), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == layout.device):
        raise ValueError(f"q, k, v and the layout must be on one device, got {q.device}, {k.device}, {v.device}, "
                         f"{layout.device}")
    (B, H, Sq, D), _ = _logical_bhsd(q, tensor_layout)
    (Bk, Hk, Skv, Dk), _ = _logical_bhsd(k, tensor_layout)
    (Bv, Hv, Sv, Dv), _ = _logical_bhsd(v, tensor_layout)
    if (Bk, Hk, Dk) != (B, H, D) or (Bv, Hv, Sv, Dv) != (Bk, Hk, Skv, Dk):
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"for tensor_layout={tensor_layout!r}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"block_sparse_attention: head_dim={D} (q shape {tuple(q.shape)}) is not supported; "
                         f"supported head dims are {SUPPORTED_HEAD_DIMS}. Use dense attention "
                         f"(torch.nn.functional.scaled_dot_product_attention) for this shape.")
    if (layout.q_len, layout.kv_len) != (Sq, Skv):
        raise ValueError(f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len} but the inputs have "
                         f"q_len={Sq}, kv_len={Skv}: build the layout for these token counts")
    if layout.num_groups not in (1, H, B * H):
        raise ValueError(f"layout has {layout.num_groups} groups; expected 1, heads={H} or batch*heads={B * H}")
    if q.device.type == "cpu" and not _INTERPRETED:
        raise ValueError("block_sparse_attention runs on CPU tensors only under TRITON_INTERPRET=1 (set before "
                         "this module is imported); use block_sparse_attention_reference on CPU otherwise")
    return B, H, Sq, Skv, D


def _forward(q, k, v, layout, tensor_layout="bhsd", dense_kv_ranges=None, sm_scale=None, return_lse=False,
             config: Optional[KernelConfig] = None):
    B, H, Sq, Skv, D = _validate(q, k, v, layout, tensor_layout)
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    if not sm_scale > 0:
        raise ValueError(f"sm_scale must be positive, got {sm_scale}")
    ranges = normalize_kv_ranges(dense_kv_ranges, Skv)
    if len(ranges) > MAX_DENSE_KV_RANGES:
        raise ValueError(f"{len(ranges)} disjoint dense_kv_ranges; at most {MAX_DENSE_KV_RANGES} are supported")
    sched = _schedule(layout, ranges)

    if tensor_layout == "bhsd":
        out = torch.empty((B, H, Sq, D), dtype=q.dtype, device=q.device)
    else:
        out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device) if return_lse else out
    strides = [_logical_bhsd(t, tensor_layout)[1] for t in (q, k, v, out)]
    largest_offset = max(max(Sq, Skv) * abs(s[2]) + D * abs(s[3]) for s in strides)
    if largest_offset >= 2**31:
        raise ValueError(f"per-head token offsets ({largest_offset}) overflow int32; use dense attention")
    tma_ok = _tma_eligible(list(zip((q, k, v, out), strides)))

    args = (q, k, v, out, lse, sched.kv_indices, sched.clean_counts, sched.total_counts, sched.q_order,
            sched.ranges, *strides[0], *strides[1], *strides[2], *strides[3],
            H, layout.num_groups, Sq, Skv, layout.num_q_blocks, sched.kv_indices.shape[-1], sm_scale * _LOG2E)
    meta = dict(HEAD_DIM=D, LAYOUT_BM=layout.block_m, LAYOUT_BN=layout.block_n, NUM_RANGES=len(ranges),
                STORE_LSE=return_lse, IEEE_DOT=q.dtype == torch.float32, TMA_OK=tma_ok)

    if config is None and not q.is_cuda:
        config = _default_interpreter_config(layout)
    if config is not None:
        if layout.block_m % config.block_m or layout.block_n % config.block_n:
            raise ValueError(f"{config} tiles do not divide the layout blocks ({layout.block_m}, {layout.block_n})")
        if config.use_tma and not (tma_ok or _INTERPRETED):
            raise ValueError("use_tma needs Hopper-class CUDA, 16-byte aligned strides and fp16/bf16 inputs")
        if config.use_tma and not _INTERPRETED:
            _ensure_tma_allocator()
        grid = (layout.num_q_blocks * (layout.block_m // config.block_m), B * H)
        _block_sparse_attn_fwd[grid](*args, **meta, **config.meta(), **config.launch_options())
    else:
        if tma_ok:
            _ensure_tma_allocator()
        grid = lambda m: (layout.num_q_blocks * (layout.block_m // m["BLOCK_M"]), B * H)  # noqa: E731
        _block_sparse_attn_fwd_tuned[grid](*args, **meta)
    return out, (lse if return_lse else None)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                           tensor_layout: str = "bhsd",
                           dense_kv_ranges: Optional[Sequence[tuple[int, int]]] = None,
                           sm_scale: Optional[float] = None, return_lse: bool = False):
    """Block-sparse attention forward.

    q: (batch, heads, q_len, head_dim) for ``tensor_layout="bhsd"`` or (batch, q_len, heads, head_dim) for
    ``"bshd"`` (diffusers); k, v likewise with kv_len tokens. Any strides are read as they are (no copies);
    the output has the input's layout and dtype. ``dense_kv_ranges``: (start, end) key ranges every query
    attends to, on top of the layout, each key counted once. Returns ``out`` or ``(out, lse)`` with lse the
    natural-log log-sum-exp, fp32 (batch, heads, q_len), -inf for rows that attend to nothing.
    Raises ValueError for shapes it does not support (the caller should then run dense attention).
    """
    out, lse = _forward(q, k, v, layout, tensor_layout, dense_kv_ranges, sm_scale, return_lse)
    return (out, lse) if return_lse else out


def merge_attention_partials(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor, *,
                             tensor_layout: str = "bhsd") -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attentions of the same queries over disjoint key sets into the attention over their union.

    lse are natural-log (batch, heads, q_len); a side with lse -inf (no keys) contributes nothing, and a row
    with no keys on either side stays 0 with lse -inf.
    """
    lse = torch.logaddexp(lse1, lse2)
    finite = torch.isfinite(lse)
    w1 = torch.where(finite, torch.exp(lse1 - lse), torch.zeros_like(lse))
    w2 = torch.where(finite, torch.exp(lse2 - lse), torch.zeros_like(lse))
    if tensor_layout == "bshd":
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    elif tensor_layout != "bhsd":
        raise ValueError(f"tensor_layout must be 'bhsd' or 'bshd', got {tensor_layout!r}")
    out = w1.unsqueeze(-1) * o1.float() + w2.unsqueeze(-1) * o2.float()
    return out.to(o1.dtype), lse


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                                     tensor_layout: str = "bhsd",
                                     dense_kv_ranges: Optional[Sequence[tuple[int, int]]] = None,
                                     sm_scale: Optional[float] = None, return_lse: bool = False):
    """Dense masked softmax with exactly the semantics of `block_sparse_attention` (float64 on CPU, float32 on
    GPU). Materialises (batch, heads, q_len, kv_len): small sizes only."""
    if tensor_layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    elif tensor_layout != "bhsd":
        raise ValueError(f"tensor_layout must be 'bhsd' or 'bshd', got {tensor_layout!r}")
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    work = torch.float64 if q.device.type == "cpu" else torch.float32
    mask = layout.to_dense_mask(Sq, Skv).clone()
    for start, end in normalize_kv_ranges(dense_kv_ranges, Skv):
        mask[:, :, start:end] = True
    groups = torch.arange(B * H, device=q.device) % layout.num_groups
    mask = mask[groups].view(B, H, Sq, Skv)
    scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * sm_scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(mask, torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(work).min)),
                        torch.zeros((), dtype=work, device=q.device))
    out = torch.matmul(probs, v.to(work)).to(q.dtype)
    if tensor_layout == "bshd":
        out = out.transpose(1, 2)
    return (out, lse.float()) if return_lse else out
