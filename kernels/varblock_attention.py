"""Variable-block sparse attention (Triton) for Sparse VideoGen2, its launch plan and a plain-PyTorch reference.

Inputs are already permuted so that every query cluster and every key cluster occupies a contiguous token range
(``q_offsets`` / ``k_offsets``, cumulative). ``selected[b, h, i, j]`` says that query cluster ``i`` attends to the
tokens of key cluster ``j``. The result is exactly dense softmax attention under the token mask
``M[r, c] = selected[qcluster(r), kcluster(c)]``: rows whose cluster selects nothing get output 0 and
log-sum-exp -inf.

Query side. Each program owns one query tile of at most ``block_m`` rows that lies inside ONE query cluster, so
every row of the tile has the same key set and the hot loop needs no per-element mask. (The alternative, fixed
tiles over the permuted sequence with a per-element mask where a tile spans clusters, would make each tile visit
the union of its clusters' key sets: with clusters of ~80-330 tokens a 128-row tile spans 1.4-2.6 clusters and
the union costs far more than the padding rows of per-cluster tiles.) A cluster of ``s`` tokens takes
``ceil(s / block_m)`` tiles, so the grid has at most ``ceil(Nq / block_m) + Cq`` tiles per head; the schedule is
built on device and unused programs exit at once. Tiles run heaviest first (most keys) so the tail holds light
work. Padding rows are the main cost of this choice (about 19% extra work for Cq=100 and 56% for Cq=400 at Wan
480p); optionally (``remainder_block_m``) a cluster's short tail runs in a second launch with lower tiles.

Key side. Adjacent selected key clusters (empty clusters between them do not break adjacency) are merged into
one contiguous token run. ``key_mode="packed"`` (default) concatenates a query cluster's runs into one virtual
key sequence and walks it in full ``BLOCK_N`` tiles, gathering each tile's rows: only the last tile of the whole
key set is partial, however small and scattered the clusters are. A tile maps its packed positions to tokens by
comparing them with the next ``KEY_WINDOW`` run starts after the run where the previous tile ended (one vector
load); a tile that crosses more run starts than that falls back to a binary search over all of them. The next
tile's tokens are looked up while the current tile computes (10% faster at 30% density on an H100). Even so, at
full density the packed walk takes 1.55x the contiguous one over the same tiles. The lookup's arithmetic is not
that cost (the window instead of the search changed nothing); its dependent index loads are, as far as the
compiled sm_90 loop shows, synchronous loads inside the loop, chained through the previous tile's run, which the
compiler cannot issue ahead. ``key_mode="indexed"`` walks the same packed tiles, but a small kernel first writes
each query cluster's key tokens out (int32, Cq * Nk per head at worst; heads go in groups within
``KEY_TOKENS_BUDGET_BYTES``), so a tile's token indices sit at an address affine in the loop counter and the
compiler pipelines their loads, and then the gathered K/V rows, ahead of the dots, as in a paged-attention walk
(compiled and tested, not yet timed on a GPU: ``DEFAULT_KEY_MODE`` stays "packed" until it is).
``key_mode="ranges"`` walks each run with contiguous tiles and a masked tail per run: no lookup,
but every run pays a partial tile (useful when runs are long).
FlashAttention-2 online softmax as in ``block_sparse_attention`` (exp2, fp32 accumulation, same step function);
LSE is natural-log fp32 (B, H, Nq), the convention of ``block_sparse_attention.merge_attention_partials``.
Loads go through pointers (gathered rows cannot use TMA tiles on Hopper).

No host synchronisation: the plan is built with torch ops on device and the grid size depends on shapes only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .block_sparse_attention import _INTERPRETED, _LOG2E, _softmax_step, merge_attention_partials

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "VarBlockConfig",
    "VarBlockPlan",
    "build_varblock_plan",
    "indexed_heads_per_launch",
    "max_query_tiles",
    "merge_attention_partials",
    "varblock_density",
    "varblock_sparse_attention",
    "varblock_sparse_attention_reference",
    "varblock_token_mask",
    "write_key_tokens",
]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
KEY_MODES = {"packed": 0, "ranges": 1, "indexed": 2}
DEFAULT_KEY_MODE = "packed"  # what key_mode=None means
# Second launch for short cluster tails (see `varblock_sparse_attention`); off until measured on the GPU.
DEFAULT_REMAINDER_BLOCK_M: Optional[int] = None
_INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _packed_tile_tokens(cum_row, start_row, pos, r0, num_k_clusters, LOG_R: tl.constexpr, WINDOW: tl.constexpr):
    """Token index of each packed position of one key tile, and the run of its last position.

    ``r0`` is the run holding the tile's first position (the previous tile's last run), so the tile's runs are
    ``r0 ... r0 + WINDOW`` unless it crosses more than ``WINDOW`` run starts: one vector load of the next
    ``WINDOW`` run starts and a compare-and-count replace the binary search's ``LOG_R`` dependent loads. A tile
    of many tiny runs (run starts past the window inside the tile) falls back to the search."""
    idx = r0 + 1 + tl.arange(0, WINDOW)
    starts = tl.load(cum_row + idx, mask=idx <= num_k_clusters, other=2147483647)
    if tl.max(starts, axis=0) > tl.max(pos, axis=0):
        r = r0 + tl.sum((starts[None, :] <= pos[:, None]).to(tl.int32), axis=1)
    else:
        r = _packed_run(cum_row, pos, num_k_clusters, LOG_R)
    tok = tl.load(start_row + r) + (pos - tl.load(cum_row + r))
    return tok, tl.max(r, axis=0)


@triton.jit
def _packed_run(cum_row, pos, num_k_clusters, LOG_R: tl.constexpr):
    """Run of each packed position: ``cum_row[r]`` is where run ``r`` begins in the packed sequence
    (nondecreasing, ``cum_row[0] == 0``, entries past the last run equal the total); a branch-free binary search
    finds the largest ``r`` with ``cum_row[r] <= pos``. Positions must be < the total; ``2**LOG_R`` must exceed
    the number of runs."""
    r = tl.zeros_like(pos)
    for step in tl.static_range(LOG_R):
        cand = r + (1 << (LOG_R - 1 - step))
        c = tl.load(cum_row + cand, mask=cand <= num_k_clusters, other=2147483647)
        r = tl.where(c <= pos, cand, r)
    return r


@triton.jit
def _varblock_attn_fwd(
    Q, K, V, O, LSE,
    Q_OFF, TILE_CLUSTER, TILE_ROW, RANGE_START, RANGE_CUM, KEY_COUNT, NUM_RUNS, KEY_TOKENS, Q_ORDER,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    heads, q_len, kv_len, num_q_clusters, num_k_clusters, num_tiles, bh_offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, LOG_R: tl.constexpr, KEY_MODE: tl.constexpr,
    STORE_LSE: tl.constexpr, IEEE_DOT: tl.constexpr, GATHER_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, KEY_WINDOW: tl.constexpr,
):
    slot = tl.program_id(0)
    bh = tl.program_id(1) + bh_offset
    cluster = tl.load(TILE_CLUSTER + bh.to(tl.int64) * num_tiles + slot)
    if cluster < 0:  # the grid is sized for the worst case; this slot has no tile
        return
    row0 = tl.load(TILE_ROW + bh.to(tl.int64) * num_tiles + slot)
    row_end = tl.load(Q_OFF + bh.to(tl.int64) * (num_q_clusters + 1) + cluster + 1)
    b = bh // heads
    h = bh % heads

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < row_end
    if GATHER_Q:  # q, out and lse stay in the caller's token order: tile row p is token Q_ORDER[p]
        rows = tl.load(Q_ORDER + bh.to(tl.int64) * q_len + offs_m, mask=row_ok, other=0)
    else:
        rows = offs_m

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    # Rows of the next cluster are read as zeros and never stored.
    q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    all_cols = offs_n < BLOCK_N

    cq = bh.to(tl.int64) * num_q_clusters + cluster
    total = tl.load(KEY_COUNT + cq)
    cum_row = RANGE_CUM + cq * (num_k_clusters + 1)
    start_row = RANGE_START + cq * num_k_clusters

    if KEY_MODE == 0:
        # Packed: full tiles of the concatenated runs (rows gathered), then one masked tail.
        # The token indices of tile t + 1 are looked up while tile t computes (carried in ``tok``), so the
        # dependent index loads stay off the K/V loads' critical path. Positions past the end are clamped to the
        # last key (only the tail tile has them, and it masks them).
        n_full = total // BLOCK_N
        last = tl.maximum(total - 1, 0)
        tok, run = _packed_tile_tokens(cum_row, start_row, tl.minimum(offs_n, last), 0, num_k_clusters, LOG_R,
                                       KEY_WINDOW)
        for t in range(0, n_full):
            k = tl.load(k_base + tok[:, None] * stride_ks + offs_d[None, :] * stride_kd)
            v = tl.load(v_base + tok[:, None] * stride_vs + offs_d[None, :] * stride_vd)
            tok, run = _packed_tile_tokens(cum_row, start_row, tl.minimum((t + 1) * BLOCK_N + offs_n, last), run,
                                           num_k_clusters, LOG_R, KEY_WINDOW)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, all_cols, False, IEEE_DOT)
        if n_full * BLOCK_N < total:
            col_ok = n_full * BLOCK_N + offs_n < total
            k = tl.load(k_base + tok[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=col_ok[:, None],
                        other=0.0)
            v = tl.load(v_base + tok[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=col_ok[:, None],
                        other=0.0)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, col_ok, True, IEEE_DOT)
    elif KEY_MODE == 2:
        # Indexed: the packed key sequence's tokens were written out (`write_key_tokens`), so a tile's token
        # indices sit at an address affine in the loop counter and the compiler's pipeliner can fetch them, and
        # then the gathered K/V rows, stages ahead of the dots (the packed lookup is a loop-carried chain of
        # dependent loads that the pipeliner cannot hoist).
        tok_row = KEY_TOKENS + (tl.program_id(1).to(tl.int64) * num_q_clusters + cluster) * kv_len
        n_full = total // BLOCK_N
        for t in range(0, n_full):
            tok = tl.load(tok_row + t * BLOCK_N + offs_n)
            k = tl.load(k_base + tok[:, None] * stride_ks + offs_d[None, :] * stride_kd)
            v = tl.load(v_base + tok[:, None] * stride_vs + offs_d[None, :] * stride_vd)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, all_cols, False, IEEE_DOT)
        if n_full * BLOCK_N < total:
            col_ok = n_full * BLOCK_N + offs_n < total
            tok = tl.load(tok_row + n_full * BLOCK_N + offs_n, mask=col_ok, other=0)
            k = tl.load(k_base + tok[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=col_ok[:, None],
                        other=0.0)
            v = tl.load(v_base + tok[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=col_ok[:, None],
                        other=0.0)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, col_ok, True, IEEE_DOT)
    else:
        # Ranges: each run with contiguous full tiles, then its masked tail.
        runs = tl.load(NUM_RUNS + cq)
        for r in range(0, runs):
            run_start = tl.load(start_row + r)
            run_len = tl.load(cum_row + r + 1) - tl.load(cum_row + r)
            n_full = run_len // BLOCK_N
            for t in range(0, n_full):
                cols = run_start + t * BLOCK_N + offs_n
                k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd)
                v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd)
                acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, all_cols, False, IEEE_DOT)
            if n_full * BLOCK_N < run_len:
                local = n_full * BLOCK_N + offs_n
                col_ok = local < run_len
                cols = run_start + local
                k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=col_ok[:, None],
                            other=0.0)
                v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=col_ok[:, None],
                            other=0.0)
                acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, col_ok, True, IEEE_DOT)

    # Rows that saw no key (the cluster selects nothing) have l_i == 0: output 0, lse -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if STORE_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + bh.to(tl.int64) * q_len + rows, lse, mask=row_ok)
    o_ptrs = o_base + rows[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _write_key_tokens(RANGE_START, RANGE_CUM, KEY_COUNT, K_ORDER, OUT, num_q_clusters, num_k_clusters, kv_len,
                      cq_offset, LOG_R: tl.constexpr, BLOCK: tl.constexpr, HAS_ORDER: tl.constexpr,
                      SHARED_STARTS: tl.constexpr):
    """Token index of every packed key position of query cluster ``cq_offset + program axis 0`` into row
    ``program axis 0`` of OUT, one chunk of ``BLOCK`` positions per program on axis 1; chunks past the cluster's
    key count exit at once. With ``HAS_ORDER`` the index is mapped back to the caller's token order. With
    ``SHARED_STARTS`` the units are the key clusters themselves, whose starts all query clusters of a head share."""
    row = tl.program_id(0).to(tl.int64)
    cq = row + cq_offset
    first = tl.program_id(1) * BLOCK
    total = tl.load(KEY_COUNT + cq)
    if first >= total:
        return
    pos = first + tl.arange(0, BLOCK)
    cum_row = RANGE_CUM + cq * (num_k_clusters + 1)
    r = _packed_run(cum_row, tl.minimum(pos, total - 1), num_k_clusters, LOG_R)
    start_row = (cq // num_q_clusters) if SHARED_STARTS else cq
    tok = tl.load(RANGE_START + start_row * num_k_clusters + r) + (pos - tl.load(cum_row + r))
    if HAS_ORDER:
        tok = tl.load(K_ORDER + (cq // num_q_clusters) * kv_len + tok).to(tl.int32)
    tl.store(OUT + row * kv_len + pos, tok, mask=pos < total)


# ------------------------------------------------------------------------------------------------------------
# Launch configuration
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VarBlockConfig:
    """Key tile width and scheduling knobs of one launch (the query tile ``block_m`` is part of the plan)."""

    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2
    maxnreg: Optional[int] = None  # register cap, e.g. to fit two CTAs per SM
    key_window: int = 16  # run starts one packed key tile looks up at once before it falls back to a search

    def launch_options(self) -> dict:
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            options["maxnreg"] = self.maxnreg
        return options

    def as_triton(self) -> triton.Config:
        return triton.Config({"BLOCK_N": self.block_n, "KEY_WINDOW": self.key_window}, **self.launch_options())


# Tuned once per (head_dim, block_m, dtype class, key mode, search depth), never per token count. The 128x64
# register-capped tile is the one that fits two CTAs per SM in block_sparse_attention (best on H100 there); the
# index lookup adds registers, so the uncapped tiles stay candidates. Measured slower and so not tried (H100, Wan
# 480p, 30%, kernel alone; capped 128x64: 7.29 ms): a third pipeline stage 8.22 ms, and a register double buffer
# of the next tile's K/V rows (one CTA per SM) 10.7 ms.
_TUNING_CANDIDATES = {
    128: [VarBlockConfig(64, 8, 2, 128), VarBlockConfig(64, 8, 2), VarBlockConfig(128, 8, 2)],
    64: [VarBlockConfig(64, 4, 2), VarBlockConfig(128, 4, 2)],
}
# key_mode="indexed", as compiled for sm_90 (checked on the CPU, not yet timed): with three (or four) stages the
# compiler fetches the token list one tile before the K/V rows it addresses, with the K/V rows still one tile
# ahead of the dots (96 KiB of shared memory at 128x64, two CTAs per SM, as with two stages); from five stages it
# keeps the K/V rows two tiles ahead, which fits two CTAs per SM only with 32-key tiles (80 KiB; 128 KiB at 64).
_INDEXED_TUNING_CANDIDATES = {
    128: [VarBlockConfig(64, 8, 3, 128), VarBlockConfig(64, 8, 2, 128), VarBlockConfig(32, 8, 5, 128),
          VarBlockConfig(64, 8, 5), VarBlockConfig(64, 8, 3), VarBlockConfig(128, 8, 3)],
    64: [VarBlockConfig(64, 4, 3), VarBlockConfig(128, 4, 3)],
}


def _config_key(c: triton.Config) -> tuple:
    return c.kwargs["BLOCK_N"], c.kwargs["KEY_WINDOW"], c.num_warps, c.num_stages, getattr(c, "maxnreg", None)


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    table = _INDEXED_TUNING_CANDIDATES if args["KEY_MODE"] == KEY_MODES["indexed"] else _TUNING_CANDIDATES
    wanted = {_config_key(c.as_triton()) for c in table.get(args["BLOCK_M"], _OTHER_BLOCK_M_CANDIDATES)}
    return [c for c in configs if _config_key(c) in wanted] or configs[:1]


_OTHER_BLOCK_M_CANDIDATES = [VarBlockConfig(32, 4, 2)]
_ALL_CANDIDATES = list(dict.fromkeys(
    [c for table in (_TUNING_CANDIDATES, _INDEXED_TUNING_CANDIDATES) for group in table.values() for c in group]
    + _OTHER_BLOCK_M_CANDIDATES))
_varblock_attn_fwd_tuned = triton.autotune(
    configs=[c.as_triton() for c in _ALL_CANDIDATES],
    key=["HEAD_DIM", "BLOCK_M", "LOG_R", "KEY_MODE", "IEEE_DOT", "GATHER_Q"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_varblock_attn_fwd)


def _default_block_m(q: torch.Tensor) -> int:
    return 128 if q.is_cuda else 16


# Small tiles keep the interpreter fast; a window below the tile width makes tests reach the search fallback too.
_INTERPRETER_CONFIG = VarBlockConfig(16, 4, 1, key_window=4)


# ------------------------------------------------------------------------------------------------------------
# Plan (built on device, no host sync)
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VarBlockPlan:
    """Tile schedule and per-query-cluster key runs of one call (shapes depend on sizes only)."""

    tile_cluster: torch.Tensor  # int32 (B*H, T): query cluster of each tile slot, -1 for unused slots
    tile_row: torch.Tensor  # int32 (B*H, T): first (permuted) query row of the tile
    range_start: torch.Tensor  # int32 (B*H, Cq, Ck): first token of each merged key run, 0 past the last run
    range_cum: torch.Tensor  # int32 (B*H, Cq, Ck + 1): packed start of each run; entries past the last = total
    key_count: torch.Tensor  # int32 (B*H, Cq): selected key tokens of each query cluster
    num_runs: Optional[torch.Tensor]  # int32 (B*H, Cq); None when key_runs is False
    block_m: int
    # Optional second launch: a cluster's last rows, when at most remainder_block_m of them are left, run as one
    # tile of remainder_block_m rows instead of padding a block_m tile.
    remainder_tile_cluster: Optional[torch.Tensor] = None  # int32 (B*H, Cq)
    remainder_tile_row: Optional[torch.Tensor] = None  # int32 (B*H, Cq)
    remainder_block_m: Optional[int] = None
    # False for a plan of key_mode="indexed" alone: the key units are the selected clusters themselves, not merged
    # runs (range_start is then (B*H, 1, Ck), shared by the query clusters, and num_runs is None).
    key_runs: bool = True

    @property
    def num_tiles(self) -> int:
        return self.tile_cluster.shape[1]



def max_query_tiles(q_len: int, num_q_clusters: int, block_m: int) -> int:
    """Upper bound on sum_c ceil(size_c / block_m) over clusters summing to q_len (shapes only)."""
    return max(1, (q_len + num_q_clusters * (block_m - 1)) // block_m)


def build_varblock_plan(q_offsets: torch.Tensor, k_offsets: torch.Tensor, selected: torch.Tensor, q_len: int,
                        block_m: int, remainder_block_m: Optional[int] = None, key_runs: bool = True) -> VarBlockPlan:
    """Query-tile schedule and merged key runs, with torch ops on the inputs' device (no host sync).
    ``key_runs=False`` skips merging adjacent clusters into runs (only key_mode="indexed" can use such a plan:
    its token lists need no runs, and the plan takes a few launches instead of about twenty)."""
    B, H, cq1 = q_offsets.shape
    num_q_clusters, num_k_clusters = cq1 - 1, k_offsets.shape[-1] - 1
    bh = B * H
    dev = q_offsets.device
    qo = q_offsets.reshape(bh, num_q_clusters + 1).to(torch.int64)
    ko = k_offsets.reshape(bh, 1, num_k_clusters + 1)
    sel = selected.reshape(bh, num_q_clusters, num_k_clusters)
    full = (bh, num_q_clusters, num_k_clusters)

    # -- merged key runs per query cluster ----------------------------------------------------------------------
    k_start, k_end = ko[..., :-1], ko[..., 1:]
    if not key_runs:  # every selected cluster is its own unit
        range_start = k_start.contiguous()
        range_cum = torch.zeros((bh, num_q_clusters, num_k_clusters + 1), dtype=torch.int32, device=dev)
        range_cum[..., 1:] = torch.cumsum(sel * (k_end - k_start), dim=-1, dtype=torch.int32)
        key_count = range_cum[..., -1].contiguous()
        num_runs = None
    else:
        kept = sel & (k_end > k_start)  # empty clusters add no tokens and do not break adjacency
        # End of the closest kept cluster before each one (offsets are nondecreasing, so a running max finds it).
        prev_end = torch.cummax(torch.where(kept, k_end, torch.full_like(k_end, -1)), dim=-1).values
        prev_end = torch.cat([torch.full_like(prev_end[..., :1], -1), prev_end[..., :-1]], dim=-1)
        run_begins = kept & (prev_end != k_start)
        run_id = torch.cumsum(run_begins, dim=-1, dtype=torch.int32) - 1
        spare = torch.full_like(run_id, num_k_clusters)  # scatter target of entries that are dropped
        wide = (bh, num_q_clusters, num_k_clusters + 1)
        range_start = torch.zeros(wide, dtype=torch.int32, device=dev)
        range_start.scatter_(-1, torch.where(run_begins, run_id, spare).long(), k_start.to(torch.int32).expand(full))
        range_end = torch.zeros(wide, dtype=torch.int32, device=dev)
        range_end.scatter_reduce_(-1, torch.where(kept, run_id, spare).long(), k_end.to(torch.int32).expand(full),
                                  reduce="amax", include_self=True)
        range_start = range_start[..., :num_k_clusters].contiguous()
        lengths = range_end[..., :num_k_clusters] - range_start  # 0 past the last run
        range_cum = torch.zeros(wide, dtype=torch.int32, device=dev)
        range_cum[..., 1:] = torch.cumsum(lengths, dim=-1, dtype=torch.int32)
        key_count = range_cum[..., -1].contiguous()
        num_runs = run_begins.sum(dim=-1, dtype=torch.int32)

    # -- query tiles ------------------------------------------------------------------------------------------
    sizes = qo[:, 1:] - qo[:, :-1]
    if remainder_block_m is None:
        big = (sizes + block_m - 1) // block_m
        small = torch.zeros_like(sizes)
    else:
        rest = sizes % block_m
        big = sizes // block_m + (rest > remainder_block_m).long()
        small = ((rest > 0) & (rest <= remainder_block_m)).long()
    tile_cluster, tile_row = _tile_slots(qo, big, torch.zeros_like(sizes), key_count, block_m,
                                         max_query_tiles(q_len, num_q_clusters, block_m))
    rem_cluster = rem_row = None
    if remainder_block_m is not None:
        rem_cluster, rem_row = _tile_slots(qo, small, big * block_m, key_count, remainder_block_m, num_q_clusters)
    return VarBlockPlan(tile_cluster, tile_row, range_start, range_cum.contiguous(), key_count,
                        None if num_runs is None else num_runs.contiguous(), block_m, rem_cluster, rem_row,
                        remainder_block_m, key_runs)


# The token lists of key_mode="indexed" take Cq * Nk * 4 bytes per (batch, head) in the worst case (1.6x the size
# of K for Cq 100, head_dim 128, bf16): heads run in groups whose lists fit this many bytes, reusing one buffer.
KEY_TOKENS_BUDGET_BYTES = 256 << 20


def indexed_heads_per_launch(batch_heads: int, num_q_clusters: int, kv_len: int) -> int:
    """(batch, head) pairs per launch of key_mode="indexed" (shapes only, no host sync)."""
    return max(1, min(batch_heads, KEY_TOKENS_BUDGET_BYTES // (num_q_clusters * kv_len * 4)))


def write_key_tokens(plan: VarBlockPlan, kv_len: int, first_bh: int = 0, num_bh: Optional[int] = None,
                     out: Optional[torch.Tensor] = None, k_order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Key token list of key_mode="indexed" for (batch, head) pairs ``first_bh ... first_bh + num_bh - 1``:
    int32 (num_bh * Cq, kv_len), row ``i * Cq + c`` holding the key tokens query cluster ``c`` of pair
    ``first_bh + i`` attends to, ascending, in its first ``key_count`` entries (the rest is left unwritten).
    With ``k_order`` ((B, H, kv_len): permuted position p holds token k_order[..., p]) the entries are the
    caller's token indices ``k_order[..., p]`` instead of the permuted positions."""
    bh, num_q_clusters = plan.key_count.shape
    num_k_clusters = plan.range_start.shape[-1]
    num_bh = bh - first_bh if num_bh is None else num_bh
    if out is None:
        out = torch.empty((num_bh * num_q_clusters, kv_len), dtype=torch.int32, device=plan.key_count.device)
    block = 16 if _INTERPRETED else 1024
    grid = (num_bh * num_q_clusters, triton.cdiv(kv_len, block))
    order = k_order.contiguous() if k_order is not None else plan.key_count
    depth = _search_depth(num_k_clusters) if plan.key_runs else max(1, num_k_clusters.bit_length())
    _write_key_tokens[grid](plan.range_start, plan.range_cum, plan.key_count, order, out, num_q_clusters,
                            num_k_clusters, kv_len, first_bh * num_q_clusters, LOG_R=depth, BLOCK=block,
                            HAS_ORDER=k_order is not None, SHARED_STARTS=not plan.key_runs)
    return out


def _tile_slots(qo, tiles, row_offset, key_count, block, slots_n):
    """(cluster, first row) of each of ``slots_n`` tile slots per head: cluster c owns ``tiles[c]`` tiles of
    ``block`` rows from row ``qo[c] + row_offset[c]``; heaviest (most keys) first, unused slots (cluster -1) last."""
    bh = qo.shape[0]
    num_q_clusters = qo.shape[1] - 1
    tile_end = torch.cumsum(tiles, dim=-1).contiguous()
    slots = torch.arange(slots_n, device=qo.device, dtype=torch.int64).expand(bh, slots_n).contiguous()
    cluster = torch.searchsorted(tile_end, slots, right=True)  # == Cq for unused slots
    used = cluster < num_q_clusters
    cluster_c = cluster.clamp(max=num_q_clusters - 1)
    first_tile = (tile_end - tiles).gather(-1, cluster_c)
    row = qo.gather(-1, cluster_c) + row_offset.gather(-1, cluster_c) + (slots - first_tile) * block
    weight = torch.where(used, key_count.gather(-1, cluster_c).to(torch.int64), torch.full_like(cluster, -1))
    order = torch.argsort(weight, dim=-1, descending=True, stable=True)
    tile_cluster = torch.where(used, cluster, torch.full_like(cluster, -1)).gather(-1, order).to(torch.int32)
    tile_row = torch.where(used, row, torch.zeros_like(row)).gather(-1, order).to(torch.int32)
    return tile_cluster.contiguous(), tile_row.contiguous()


# ------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------
def _validate(q, k, v, q_offsets, k_offsets, selected, *, check_values: bool, for_kernel: bool):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4D (batch, heads, tokens, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype of float16/bfloat16/float32, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if tuple(k.shape) != (B, H, Nk, D) or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         f"expected q (B, H, Nq, D) and k, v (B, H, Nk, D)")
    if Nq < 1 or Nk < 1:
        raise ValueError(f"q and k need at least one token, got Nq={Nq}, Nk={Nk}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"varblock_sparse_attention: head_dim={D} (q shape {tuple(q.shape)}) is not supported; "
                         f"supported head dims are {SUPPORTED_HEAD_DIMS}. Use dense attention for this shape.")
    for name, off, n in (("q_offsets", q_offsets, Nq), ("k_offsets", k_offsets, Nk)):
        if not isinstance(off, torch.Tensor) or off.dtype != torch.int32 or off.dim() != 3 \
                or tuple(off.shape[:2]) != (B, H) or off.shape[2] < 2:
            raise ValueError(f"{name} must be an int32 (B={B}, H={H}, clusters + 1) tensor of cumulative offsets, "
                             f"got {off.dtype if isinstance(off, torch.Tensor) else type(off).__name__} "
                             f"{tuple(off.shape) if isinstance(off, torch.Tensor) else ''}")
    Cq, Ck = q_offsets.shape[2] - 1, k_offsets.shape[2] - 1
    if not isinstance(selected, torch.Tensor) or selected.dtype != torch.bool \
            or tuple(selected.shape) != (B, H, Cq, Ck):
        raise ValueError(f"selected must be a bool (B, H, Cq, Ck) = {(B, H, Cq, Ck)} tensor (from q_offsets / "
                         f"k_offsets), got {selected.dtype if isinstance(selected, torch.Tensor) else selected!r} "
                         f"{tuple(selected.shape) if isinstance(selected, torch.Tensor) else ''}")
    devices = {t.device for t in (q, k, v, q_offsets, k_offsets, selected)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    if check_values:
        for name, off, n in (("q_offsets", q_offsets, Nq), ("k_offsets", k_offsets, Nk)):
            if bool((off[..., 0] != 0).any()) or bool((off[..., -1] != n).any()):
                raise ValueError(f"{name} must start at 0 and end at the token count {n} for every (batch, head); "
                                 f"got first {off[..., 0].unique().tolist()} and last {off[..., -1].unique().tolist()}")
            if bool((off[..., 1:] < off[..., :-1]).any()):
                raise ValueError(f"{name} must be nondecreasing (cumulative cluster sizes)")
    if for_kernel:
        if q.device.type == "cpu" and not _INTERPRETED:
            raise ValueError("varblock_sparse_attention runs on CPU tensors only under TRITON_INTERPRET=1 (set before "
                             "the kernels are imported); use varblock_sparse_attention_reference on CPU otherwise")
        largest = max(max(Nq, Nk) * abs(t.stride(2)) + D * abs(t.stride(3)) for t in (q, k, v))
        if largest >= 2**31:
            raise ValueError(f"per-head token offsets ({largest}) overflow int32; use dense attention")
    return B, H, Nq, Nk, D, Cq, Ck


# ------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------
def _forward(q, k, v, q_offsets, k_offsets, selected, sm_scale=None, return_lse=False, *, key_mode=None,
             block_m: Optional[int] = None, remainder_block_m: Optional[int] = -1,
             config: Optional[VarBlockConfig] = None, remainder_config: Optional[VarBlockConfig] = None,
             check_offsets: Optional[bool] = None, plan: Optional[VarBlockPlan] = None,
             q_order: Optional[torch.Tensor] = None, k_order: Optional[torch.Tensor] = None):
    ordered = _check_orders(q, k, q_order, k_order)
    if ordered and key_mode not in (None, "indexed"):
        raise ValueError(f"q_order / k_order need key_mode='indexed' (the only walk that gathers key rows through a "
                         f"token list), got key_mode={key_mode!r}")
    key_mode = ("indexed" if ordered else DEFAULT_KEY_MODE) if key_mode is None else key_mode
    if key_mode not in KEY_MODES:
        raise ValueError(f"key_mode must be one of {sorted(KEY_MODES)}, got {key_mode!r}")
    check = (q.device.type == "cpu") if check_offsets is None else bool(check_offsets)
    B, H, Nq, Nk, D, Cq, Ck = _validate(q, k, v, q_offsets, k_offsets, selected, check_values=check,
                                        for_kernel=True)
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    if not sm_scale > 0:
        raise ValueError(f"sm_scale must be positive, got {sm_scale}")
    block_m = _default_block_m(q) if block_m is None else int(block_m)
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if remainder_block_m == -1:  # the module default, only meaningful next to the default block_m
        remainder_block_m = DEFAULT_REMAINDER_BLOCK_M if q.is_cuda and block_m == 128 else None
    if remainder_block_m is not None:
        remainder_block_m = int(remainder_block_m)
        if remainder_block_m < 16 or remainder_block_m & (remainder_block_m - 1) or remainder_block_m >= block_m:
            raise ValueError(f"remainder_block_m must be a power of two >= 16 below block_m={block_m}, "
                             f"got {remainder_block_m}")
    indexed = key_mode == "indexed"
    if plan is None:
        plan = build_varblock_plan(q_offsets, k_offsets, selected, Nq, block_m, remainder_block_m,
                                   key_runs=not indexed)
    elif (plan.block_m, plan.remainder_block_m) != (block_m, remainder_block_m):
        raise ValueError(f"plan was built for block_m={plan.block_m}, remainder_block_m={plan.remainder_block_m}, "
                         f"not {block_m}, {remainder_block_m}")
    elif not plan.key_runs and not indexed:
        raise ValueError(f"key_mode={key_mode!r} needs a plan of merged key runs (build_varblock_plan with "
                         f"key_runs=True); this one was built for key_mode='indexed' only")

    out = torch.empty_like(q)  # q's memory layout: a (B, N, H, D) caller gets its own layout back
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device) if return_lse else out
    q_off = q_offsets.reshape(B * H, Cq + 1).contiguous()
    launches = [(plan.tile_cluster, plan.tile_row, block_m, config)]
    if plan.remainder_block_m is not None:
        launches.append((plan.remainder_tile_cluster, plan.remainder_tile_row, plan.remainder_block_m,
                         remainder_config))
    # key_mode="indexed" runs the (batch, head) pairs in groups whose token lists fit one reused buffer.
    group = indexed_heads_per_launch(B * H, Cq, Nk) if indexed else B * H
    tokens = None
    for first_bh in range(0, B * H, group):
        num_bh = min(group, B * H - first_bh)
        if indexed:
            tokens = write_key_tokens(plan, Nk, first_bh, num_bh,
                                      out=None if tokens is None else tokens[:num_bh * Cq], k_order=k_order)
        for tile_cluster, tile_row, tile_m, cfg in launches:  # disjoint query rows
            num_tiles = tile_cluster.shape[1]
            args = (q, k, v, out, lse, q_off, tile_cluster, tile_row, plan.range_start, plan.range_cum,
                    plan.key_count, plan.key_count if plan.num_runs is None else plan.num_runs,
                    tokens if indexed else plan.key_count,
                    q_order.contiguous() if ordered else plan.key_count,
                    *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, Nq, Nk, Cq, Ck, num_tiles, first_bh,
                    sm_scale * _LOG2E)
            meta = dict(HEAD_DIM=D, BLOCK_M=tile_m, LOG_R=_search_depth(Ck), KEY_MODE=KEY_MODES[key_mode],
                        STORE_LSE=return_lse, IEEE_DOT=q.dtype == torch.float32, GATHER_Q=ordered)
            grid = (num_tiles, num_bh)
            if cfg is None and not q.is_cuda:
                cfg = _INTERPRETER_CONFIG
            if cfg is not None:
                _varblock_attn_fwd[grid](*args, **meta, BLOCK_N=cfg.block_n, KEY_WINDOW=cfg.key_window,
                                         **cfg.launch_options())
            else:
                _varblock_attn_fwd_tuned[grid](*args, **meta)
    return out, (lse if return_lse else None)


def _check_orders(q, k, q_order, k_order) -> bool:
    """True when both token orders are given (and valid in shape, dtype and device)."""
    if q_order is None and k_order is None:
        return False
    if q_order is None or k_order is None:
        raise ValueError("pass both q_order and k_order (or neither)")
    for name, order, t in (("q_order", q_order, q), ("k_order", k_order, k)):
        if not isinstance(order, torch.Tensor) or order.dtype not in (torch.int32, torch.int64) \
                or tuple(order.shape) != tuple(t.shape[:3]) or order.device != t.device:
            raise ValueError(f"{name} must be an int32/int64 {tuple(t.shape[:3])} (batch, heads, tokens) tensor on "
                             f"{t.device}: permuted position p holds the token {name}[..., p]; got "
                             f"{order.dtype if isinstance(order, torch.Tensor) else type(order).__name__} "
                             f"{tuple(order.shape) if isinstance(order, torch.Tensor) else ''}")
    return True


def _search_depth(num_k_clusters: int) -> int:
    """Binary-search steps over a query cluster's runs: runs are separated by at least one unselected nonempty
    cluster, so there are at most ceil(Ck / 2) of them and indices below 2**depth must reach that many."""
    return max(1, ((num_k_clusters + 1) // 2).bit_length())


def varblock_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: torch.Tensor,
                              k_offsets: torch.Tensor, selected: torch.Tensor, *, sm_scale: Optional[float] = None,
                              return_lse: bool = False, key_mode: Optional[str] = None,
                              block_m: Optional[int] = None,
                              remainder_block_m: Optional[int] = -1, check_offsets: Optional[bool] = None,
                              q_order: Optional[torch.Tensor] = None, k_order: Optional[torch.Tensor] = None):
    """Sparse attention of clustered (permuted) tokens: query cluster ``i`` sees the keys of every key cluster
    ``j`` with ``selected[b, h, i, j]``.

    q: (B, H, Nq, D), k/v: (B, H, Nk, D), fp16/bf16/fp32, any strides. q_offsets (B, H, Cq + 1) / k_offsets
    (B, H, Ck + 1): int32 cumulative cluster offsets (first 0, last Nq / Nk; empty clusters allowed).
    selected: bool (B, H, Cq, Ck). Returns out (B, H, Nq, D) in q's dtype, or (out, lse) with the natural-log
    float32 log-sum-exp (B, H, Nq) (-inf and output 0 for rows whose cluster selects nothing), mergeable with
    ``merge_attention_partials``.

    ``key_mode``: "packed" (gathered full key tiles), "indexed" (the same tiles from a token list the plan
    writes out; more memory, see `VarBlockPlan.key_tokens`) or "ranges" (contiguous tiles per merged run); None
    means ``DEFAULT_KEY_MODE``. ``block_m``: query tile rows (128 on GPU). ``remainder_block_m``: when set (e.g.
    64), a cluster's last rows, if at most that many, run in a second launch with tiles of that height instead of
    padding a ``block_m`` tile (default: ``DEFAULT_REMAINDER_BLOCK_M`` on GPU with 128-row tiles; None turns it
    off). ``check_offsets``:
    verify offset values (first 0, last N, nondecreasing); this reads them on the host, so the default does it
    only for CPU tensors.
    ``q_order`` / ``k_order`` ((B, H, Nq) / (B, H, Nk) int32/int64, position p of the clustered order holds
    token ``order[..., p]``): q, k, v are then in the caller's own token order and are never permuted; the kernel
    gathers query rows and (``key_mode="indexed"``, the default then) key rows through the orders and writes out
    and lse back in that order. Offsets and ``selected`` still describe the clustered order.
    Raises ValueError for inputs it does not support (the caller should then use dense attention).
    """
    out, lse = _forward(q, k, v, q_offsets, k_offsets, selected, sm_scale, return_lse, key_mode=key_mode,
                        block_m=block_m, remainder_block_m=remainder_block_m, check_offsets=check_offsets,
                        q_order=q_order, k_order=k_order)
    return (out, lse) if return_lse else out


def _token_clusters(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, n) int64 cluster of every token (empty clusters own no token)."""
    ends = offsets[..., 1:].to(torch.int64).contiguous()
    tokens = torch.arange(n, device=offsets.device, dtype=torch.int64).expand(*ends.shape[:2], n).contiguous()
    return torch.searchsorted(ends, tokens, right=True)


def varblock_token_mask(q_offsets: torch.Tensor, k_offsets: torch.Tensor, selected: torch.Tensor, q_len: int,
                        kv_len: int) -> torch.Tensor:
    """Boolean (B, H, Nq, Nk) token mask M[r, c] = selected[qcluster(r), kcluster(c)] (small sizes only)."""
    q_cl = _token_clusters(q_offsets, q_len)
    k_cl = _token_clusters(k_offsets, kv_len)
    Ck = selected.shape[-1]
    rows = torch.gather(selected, 2, q_cl.unsqueeze(-1).expand(-1, -1, -1, Ck))  # (B, H, Nq, Ck)
    return torch.gather(rows, 3, k_cl.unsqueeze(2).expand(-1, -1, q_len, -1))


def varblock_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets: torch.Tensor,
                                        k_offsets: torch.Tensor, selected: torch.Tensor, *,
                                        sm_scale: Optional[float] = None, return_lse: bool = False,
                                        q_order: Optional[torch.Tensor] = None,
                                        k_order: Optional[torch.Tensor] = None):
    """Dense masked softmax in float32 with exactly the semantics of `varblock_sparse_attention`.
    Materialises (B, H, Nq, Nk): small sizes only. Checks offset values (reads them on the host)."""
    B, H, Nq, Nk, D, Cq, Ck = _validate(q, k, v, q_offsets, k_offsets, selected, check_values=True,
                                        for_kernel=False)
    if _check_orders(q, k, q_order, k_order):  # permute, attend, and put the rows back in the caller's order
        from .cluster_permute import permute_tokens_reference, unpermute_tokens_reference

        out_p, lse_p = varblock_sparse_attention_reference(
            permute_tokens_reference(q.transpose(1, 2), q_order), permute_tokens_reference(k.transpose(1, 2), k_order),
            permute_tokens_reference(v.transpose(1, 2), k_order), q_offsets, k_offsets, selected, sm_scale=sm_scale,
            return_lse=True)
        out = unpermute_tokens_reference(out_p, q_order).transpose(1, 2)
        lse = torch.empty_like(lse_p).scatter_(2, q_order.long(), lse_p)
        return (out, lse) if return_lse else out
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    mask = varblock_token_mask(q_offsets, k_offsets, selected, Nq, Nk)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * sm_scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(mask, torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min)),
                        torch.zeros((), dtype=torch.float32, device=q.device))
    out = torch.matmul(probs, v.float()).to(q.dtype)
    return (out, lse) if return_lse else out


def varblock_density(q_offsets: torch.Tensor, k_offsets: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """(B, H) float32 kept fraction of the Nq x Nk token map (no host sync)."""
    q_sizes = (q_offsets[..., 1:] - q_offsets[..., :-1]).double()
    k_sizes = (k_offsets[..., 1:] - k_offsets[..., :-1]).double()
    kept = torch.matmul(torch.matmul(q_sizes.unsqueeze(-2), selected.double()), k_sizes.unsqueeze(-1))
    total = q_offsets[..., -1].double() * k_offsets[..., -1].double()
    return (kept.squeeze(-1).squeeze(-1) / total).float()
