"""Cluster permutation for SVG2: make each cluster's tokens contiguous, and undo it on the attention output.

``cluster_permutation`` sorts the labels of every (batch, head) stably on the device (tokens of one cluster keep
their original order) and finds the cluster boundaries with a batched ``searchsorted`` over the sorted labels: no
atomics, no host synchronisation. ``permute_tokens`` gathers the tokens of a (B, N, H, D) tensor (the attention
processors' layout) into a contiguous (B, H, N, D) tensor in cluster order, ``unpermute_tokens`` scatters a
permuted (B, H, N, D) tensor back to (B, N, H, D) in the original order, and ``permute_qkv`` permutes q by the
query order and k, v by the key order in one launch. Each Triton program moves a tile of whole rows (head_dim
contiguous), so the copies run at memory bandwidth; offsets are 64-bit. Every function has a PyTorch reference
beside it, and ``backend="auto"`` uses the kernels on CUDA (and on CPU under ``TRITON_INTERPRET=1``), the
references on plain CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
import torch
import triton
import triton.language as tl

__all__ = [
    "ClusterPermutation",
    "cluster_permutation",
    "cluster_permutation_reference",
    "permute_qkv",
    "permute_qkv_reference",
    "permute_tokens",
    "permute_tokens_reference",
    "unpermute_tokens",
    "unpermute_tokens_reference",
]

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BACKENDS = ("auto", "triton", "torch")
_BLOCK_ROWS = 64


@dataclass
class ClusterPermutation:
    order: torch.Tensor  # (B, H, N) int64: permuted position p holds original token order[..., p]
    offsets: torch.Tensor  # (B, H, C + 1) int32: cluster c occupies [offsets[c], offsets[c+1]) in permuted order
    sizes: torch.Tensor  # (B, H, C) int32


# ------------------------------------------------------------------------------------------------------------
# Sorting
# ------------------------------------------------------------------------------------------------------------
def _check_labels(labels, num_clusters, where):
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{where}: labels must be a (batch, heads, tokens) tensor, got {shape}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{where}: labels must be int32 or int64, got {labels.dtype}")
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"{where}: num_clusters must be a positive int, got {num_clusters!r}")
    if labels.shape[-1] == 0:
        raise ValueError(f"{where}: labels have no tokens")


def cluster_permutation(labels: torch.Tensor, num_clusters: int) -> ClusterPermutation:
    """Stable sort of every (batch, head)'s labels; offsets and sizes of the clusters in that order.

    Labels must lie in [0, num_clusters) (not checked: that would synchronise with the host).
    """
    _check_labels(labels, num_clusters, "cluster_permutation")
    B, H, N = labels.shape
    sorted_labels, order = torch.sort(labels, dim=-1, stable=True)
    boundaries = torch.arange(num_clusters + 1, device=labels.device, dtype=labels.dtype)
    # First position whose label is >= c, for c = 0..C: cluster c spans [offsets[c], offsets[c+1]).
    offsets = torch.searchsorted(sorted_labels, boundaries.expand(B, H, num_clusters + 1).contiguous(),
                                 out_int32=True)
    # Pin the ends so the offsets always cover [0, N) (only out-of-range labels could move them).
    offsets[..., 0] = 0
    offsets[..., -1] = N
    sizes = offsets[..., 1:] - offsets[..., :-1]
    return ClusterPermutation(order=order, offsets=offsets, sizes=sizes)


def cluster_permutation_reference(labels: torch.Tensor, num_clusters: int) -> ClusterPermutation:
    """Per-row Python reference of ``cluster_permutation`` (slow; tests only)."""
    _check_labels(labels, num_clusters, "cluster_permutation_reference")
    B, H, N = labels.shape
    order = torch.empty((B, H, N), dtype=torch.int64)
    sizes = torch.zeros((B, H, num_clusters), dtype=torch.int32)
    rows = labels.cpu().tolist()
    for b in range(B):
        for h in range(H):
            row = rows[b][h]
            order[b, h] = torch.tensor(sorted(range(N), key=lambda i: row[i]))  # Python's sort is stable
            for lab in row:
                sizes[b, h, lab] += 1
    offsets = torch.zeros((B, H, num_clusters + 1), dtype=torch.int32)
    offsets[..., 1:] = sizes.cumsum(-1)
    dev = labels.device
    return ClusterPermutation(order=order.to(dev), offsets=offsets.to(dev), sizes=sizes.to(dev))


# ------------------------------------------------------------------------------------------------------------
# Triton gather / scatter
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _move_rows(src_ptr, dst_ptr, order_ptr, pid_n, b, h, N,
               s_src_b, s_src_n, s_src_h, s_src_d,
               s_dst_b, s_dst_n, s_dst_h, s_dst_d,
               s_ord_b, s_ord_h, s_ord_n,
               D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SCATTER: tl.constexpr):
    """Rows p of one tile: gather dst[b, h, p] = src[b, order[p], h], or scatter dst[b, order[p], h] = src[b, h, p].

    Strides are given in (batch, token, head, dim) order for both tensors, whatever their memory layout.
    """
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_p < N
    mask = row_ok[:, None] & (offs_d < D)[None, :]
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    token = tl.load(order_ptr + b64 * s_ord_b + h64 * s_ord_h + offs_p.to(tl.int64) * s_ord_n,
                    mask=row_ok, other=0).to(tl.int64)
    pos = offs_p.to(tl.int64)
    if SCATTER:
        src_rows = pos
        dst_rows = token
    else:
        src_rows = token
        dst_rows = pos
    src = src_ptr + b64 * s_src_b + h64 * s_src_h + src_rows[:, None] * s_src_n + offs_d[None, :] * s_src_d
    dst = dst_ptr + b64 * s_dst_b + h64 * s_dst_h + dst_rows[:, None] * s_dst_n + offs_d[None, :] * s_dst_d
    tl.store(dst, tl.load(src, mask=mask), mask=mask)


@triton.jit
def _permute_kernel(src0, dst0, ord0, src1, dst1, ord1, src2, dst2, ord2,
                    N0, N1, N2, H, D,
                    ss0_b, ss0_n, ss0_h, ss0_d, sd0_b, sd0_n, sd0_h, sd0_d, so0_b, so0_h, so0_n,
                    ss1_b, ss1_n, ss1_h, ss1_d, sd1_b, sd1_n, sd1_h, sd1_d, so1_b, so1_h, so1_n,
                    ss2_b, ss2_n, ss2_h, ss2_d, sd2_b, sd2_n, sd2_h, sd2_d, so2_b, so2_h, so2_n,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SCATTER: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    which = tl.program_id(2)  # tensor 0, 1 or 2 (e.g. q, k, v): one launch moves all of them
    b = pid_bh // H
    h = pid_bh % H
    if which == 0:
        if pid_n * BLOCK_N < N0:
            _move_rows(src0, dst0, ord0, pid_n, b, h, N0, ss0_b, ss0_n, ss0_h, ss0_d, sd0_b, sd0_n, sd0_h, sd0_d,
                       so0_b, so0_h, so0_n, D, BLOCK_N, BLOCK_D, SCATTER)
    elif which == 1:
        if pid_n * BLOCK_N < N1:
            _move_rows(src1, dst1, ord1, pid_n, b, h, N1, ss1_b, ss1_n, ss1_h, ss1_d, sd1_b, sd1_n, sd1_h, sd1_d,
                       so1_b, so1_h, so1_n, D, BLOCK_N, BLOCK_D, SCATTER)
    else:
        if pid_n * BLOCK_N < N2:
            _move_rows(src2, dst2, ord2, pid_n, b, h, N2, ss2_b, ss2_n, ss2_h, ss2_d, sd2_b, sd2_n, sd2_h, sd2_d,
                       so2_b, so2_h, so2_n, D, BLOCK_N, BLOCK_D, SCATTER)


def _bnhd_strides(t: torch.Tensor, layout: str):
    """Strides of t in (batch, token, head, dim) order."""
    sb, s1, s2, sd = t.stride()
    return (sb, s1, s2, sd) if layout == "bnhd" else (sb, s2, s1, sd)


def _launch(pairs, scatter: bool, block_rows: int = _BLOCK_ROWS):
    """pairs: up to 3 (src, dst, order); src/dst are bnhd/bhnd (gather) or bhnd/bnhd (scatter)."""
    src_layout, dst_layout = ("bhnd", "bnhd") if scatter else ("bnhd", "bhnd")
    B = pairs[0][0].shape[0]
    H, D = pairs[0][2].shape[1], pairs[0][0].shape[-1]
    lengths = [order.shape[-1] for _, _, order in pairs]
    padded = list(pairs) + [pairs[0]] * (3 - len(pairs))
    pointer_args, strides = [], []
    for src, dst, order in padded:
        pointer_args += [src, dst, order]
        strides += [*_bnhd_strides(src, src_layout), *_bnhd_strides(dst, dst_layout), *order.stride()]
    lengths_padded = lengths + [0] * (3 - len(lengths))
    grid = (triton.cdiv(max(lengths), block_rows), B * H, len(pairs))
    block_d = triton.next_power_of_2(D)
    _permute_kernel[grid](*pointer_args, *lengths_padded, H, D, *strides,
                          BLOCK_N=block_rows, BLOCK_D=block_d, SCATTER=scatter, num_warps=4)


# ------------------------------------------------------------------------------------------------------------
# Public wrappers
# ------------------------------------------------------------------------------------------------------------
def _use_triton(t: torch.Tensor, backend: str, where: str) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"{where}: backend must be one of {_BACKENDS}, got {backend!r}")
    runnable = t.is_cuda or (_INTERPRETED and t.device.type == "cpu")
    if backend == "triton" and not runnable:
        raise ValueError(f"{where}: the Triton kernel runs on CUDA tensors, or on CPU tensors only under "
                         f"TRITON_INTERPRET=1 (set before vidaccel.kernels.cluster_permute is imported); "
                         f"use backend='torch' here")
    return backend == "triton" or (backend == "auto" and runnable)


def _check_pair(t: torch.Tensor, order: torch.Tensor, where: str, layout: str, name: str = "x"):
    expect = "(B, N, H, D)" if layout == "bnhd" else "(B, H, N, D)"
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{where}: {name} must be a 4-d {expect} tensor, got {shape}")
    if not isinstance(order, torch.Tensor) or order.dim() != 3:
        shape = tuple(order.shape) if isinstance(order, torch.Tensor) else type(order).__name__
        raise ValueError(f"{where}: order must be a (B, H, N) tensor (ClusterPermutation.order), got {shape}")
    if order.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{where}: order must be int32 or int64, got {order.dtype}")
    B, N, H = (t.shape[0], t.shape[1], t.shape[2]) if layout == "bnhd" else (t.shape[0], t.shape[2], t.shape[1])
    if tuple(order.shape) != (B, H, N):
        raise ValueError(f"{where}: {name} {tuple(t.shape)} in {expect} layout needs order of shape {(B, H, N)}, "
                         f"got {tuple(order.shape)}")
    if order.device != t.device:
        raise ValueError(f"{where}: order is on {order.device} but {name} is on {t.device}")
    if t.numel() == 0:
        raise ValueError(f"{where}: {name} is empty, shape {tuple(t.shape)}")
    return B, N, H, t.shape[3]


def permute_tokens(x: torch.Tensor, order: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """x (B, N, H, D) -> contiguous (B, H, N, D) with y[b, h, p] = x[b, order[b, h, p], h]."""
    B, N, H, D = _check_pair(x, order, "permute_tokens", "bnhd")
    if not _use_triton(x, backend, "permute_tokens"):
        return permute_tokens_reference(x, order)
    y = torch.empty((B, H, N, D), dtype=x.dtype, device=x.device)
    _launch([(x, y, order)], scatter=False)
    return y


def permute_tokens_reference(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    B, N, H, D = _check_pair(x, order, "permute_tokens_reference", "bnhd")
    return torch.gather(x.transpose(1, 2), 2, order.to(torch.int64).unsqueeze(-1).expand(B, H, N, D)).contiguous()


def unpermute_tokens(y: torch.Tensor, order: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """y (B, H, N, D) in cluster order -> (B, N, H, D) in the original token order (inverse of permute_tokens).

    ``order`` must be a permutation of 0..N-1 per (batch, head), as cluster_permutation returns.
    """
    B, N, H, D = _check_pair(y, order, "unpermute_tokens", "bhnd", name="y")
    if not _use_triton(y, backend, "unpermute_tokens"):
        return unpermute_tokens_reference(y, order)
    out = torch.empty((B, N, H, D), dtype=y.dtype, device=y.device)
    _launch([(y, out, order)], scatter=True)
    return out


def unpermute_tokens_reference(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    B, N, H, D = _check_pair(y, order, "unpermute_tokens_reference", "bhnd", name="y")
    out = torch.empty((B, H, N, D), dtype=y.dtype, device=y.device)
    out.scatter_(2, order.to(torch.int64).unsqueeze(-1).expand(B, H, N, D), y)
    return out.transpose(1, 2).contiguous()


def permute_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_order: torch.Tensor,
                k_order: torch.Tensor, *, backend: str = "auto"):
    """permute_tokens(q, q_order), permute_tokens(k, k_order), permute_tokens(v, k_order) in one launch."""
    Bq, Nq, Hq, Dq = _check_pair(q, q_order, "permute_qkv", "bnhd", name="q")
    Bk, Nk, Hk, Dk = _check_pair(k, k_order, "permute_qkv", "bnhd", name="k")
    Bv, Nv, Hv, Dv = _check_pair(v, k_order, "permute_qkv", "bnhd", name="v")
    if not (Bq == Bk == Bv and Hq == Hk == Hv and Dq == Dk == Dv and q.dtype == k.dtype == v.dtype
            and q.device == k.device == v.device):
        raise ValueError(f"permute_qkv: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, v "
                         f"{tuple(v.shape)} {v.dtype} must share batch, heads, head_dim, dtype and device; "
                         f"call permute_tokens on each otherwise")
    if not _use_triton(q, backend, "permute_qkv"):
        return permute_qkv_reference(q, k, v, q_order, k_order)
    outs = [torch.empty((Bq, Hq, n, Dq), dtype=q.dtype, device=q.device) for n in (Nq, Nk, Nv)]
    _launch([(q, outs[0], q_order), (k, outs[1], k_order), (v, outs[2], k_order)], scatter=False)
    return tuple(outs)


def permute_qkv_reference(q, k, v, q_order, k_order):
    return (permute_tokens_reference(q, q_order), permute_tokens_reference(k, k_order),
            permute_tokens_reference(v, k_order))
