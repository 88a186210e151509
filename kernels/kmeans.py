"""Batched k-means over head_dim for every (batch, head) independently (SVG2 query/key clustering).

Assignment. A Triton kernel: one program owns a tile of tokens of one (batch, head), streams the centroids of
that head tile by tile and keeps a running (min distance, argmin) per token, so the tokens x clusters distance
matrix never reaches HBM. Distance up to a per-token constant: ``||c||^2 - 2 x.c`` (``||x||^2`` does not change
the argmin). 16-bit inputs run the dot product on tensor cores with the centroids rounded to the input dtype
(the squared norms are taken from those rounded centroids, so each distance is exact for the centroid actually
used); float32 inputs use IEEE float32 dots. Ties go to the lowest cluster index, as ``torch.argmin``.

Update. Means of the clusters; an empty cluster keeps its previous centroid. Three ways (``method``):
  * ``"index_put"`` (default): PyTorch scatter on a flat ``(B*H*C)`` index with ``index_put_(accumulate=True)``,
    which CUDA implements by sorting the indices and summing each segment in a fixed order (bitwise
    reproducible); the float32 copy of the inputs is made a few heads at a time to bound transient memory;
  * ``"index_add"``: the same with ``index_add_`` (float atomics on CUDA: last bits may differ between runs);
  * ``"sorted"``: stable sort of the labels per (batch, head) on the device, then a Triton kernel that sums
    each cluster's rows in sorted order (one program per cluster; deterministic, no float32 copy, no atomics).
    Needs the Triton kernels (CUDA or the interpreter); elsewhere it falls back to ``"index_put"``.

Driver. ``batched_kmeans`` initialises with distinct random tokens picked by a ``torch.Generator`` seeded with
``seed`` (deterministic on a given device), or warm-starts from given centroids. The returned centroids are the
means of the returned labels' clusters (labels from the last assignment), so they describe exactly the clusters
that the permutation will make contiguous. With the sorted update the result also carries the sort order and
cluster offsets it used (exactly SVG2's cluster permutation of the final labels), so SVG2 does not sort again.
``stop_when_stable`` compares the labels of consecutive iterations on the host every few iterations (meant for
the first, cold call); without it the loop never synchronises.

Backends. ``backend="auto"`` runs the Triton kernel on CUDA tensors and on CPU tensors under
``TRITON_INTERPRET=1`` (set before this module is imported), and the PyTorch reference on plain CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = [
    "KMeansResult",
    "batched_kmeans",
    "kmeans_assign",
    "kmeans_assign_reference",
    "kmeans_inertia",
    "kmeans_update",
]

# `triton.jit` picks the interpreter at decoration time, so this is fixed once the module is imported.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BACKENDS = ("auto", "triton", "torch")
# Labels of consecutive iterations are compared on the host this often when stop_when_stable is set.
STABILITY_CHECK_EVERY = 4
# Elements of the float32 copy that kmeans_update makes at once (256 MiB).
_UPDATE_CHUNK_ELEMENTS = 1 << 26
# Elements of one distance block in the PyTorch reference (128 MiB of float32).
_REFERENCE_CHUNK_ELEMENTS = 1 << 25


@dataclass
class KMeansResult:
    labels: torch.Tensor  # (B, H, N) int32, cluster of each token
    centroids: torch.Tensor  # (B, H, C, D) float32, mean of each cluster (previous centroid if empty)
    sizes: torch.Tensor  # (B, H, C) int32, tokens per cluster
    iterations: int  # iterations actually run
    # When the sorted update ran: the stable sort of `labels` per (batch, head) that it walked (int64 (B, H, N),
    # as cluster_permute.cluster_permutation's order) and the cluster offsets (int32 (B, H, C + 1)); else None.
    order: Optional[torch.Tensor] = None
    offsets: Optional[torch.Tensor] = None


# ------------------------------------------------------------------------------------------------------------
# Triton assignment kernel
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _assign_kernel(x_ptr, c_ptr, cnorm_ptr, labels_ptr,
                   stride_xb, stride_xh, stride_xn, stride_xd,
                   H, N, C, D,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                   IEEE_DOT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < N
    d_ok = offs_d < D
    x_base = x_ptr + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    x = tl.load(x_base + offs_n[:, None].to(tl.int64) * stride_xn + offs_d[None, :] * stride_xd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Centroids and their norms are contiguous (B*H, C, D) / (B*H, C) tensors made by the wrapper.
    c_base = c_ptr + pid_bh.to(tl.int64) * C * D
    n_base = cnorm_ptr + pid_bh.to(tl.int64) * C
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        cent = tl.load(c_base + offs_c[:, None] * D + offs_d[None, :],
                       mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        # Padding clusters get +inf norms, so they never win.
        cnorm = tl.load(n_base + offs_c, mask=c_ok, other=float("inf"))
        if IEEE_DOT:
            dots = tl.dot(x, tl.trans(cent), input_precision="ieee")
        else:
            dots = tl.dot(x, tl.trans(cent))
        dist = cnorm[None, :] - 2.0 * dots
        tile_min = tl.min(dist, axis=1)
        tile_arg = tl.argmin(dist, axis=1)
        # Strictly smaller: on ties the earlier tile (lower index) keeps the token, like torch.argmin.
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, (tile_arg + c0).to(tl.int32), best_idx)
    tl.store(labels_ptr + pid_bh.to(tl.int64) * N + offs_n, best_idx, mask=row_ok)


# (BLOCK_N, BLOCK_C, num_warps, num_stages). A per-slot running minimum reduced once at the end (instead of an
# argmin per centroid tile) gave the same labels but no speed on an H200 (results/kmeans_2026-12-06.json).
ASSIGN_TUNING_CANDIDATES = [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 4, 2)]


def _assign_configs():
    return [triton.Config({"BLOCK_N": bn, "BLOCK_C": bc}, num_warps=w, num_stages=st)
            for bn, bc, w, st in ASSIGN_TUNING_CANDIDATES]


_assign_kernel_tuned = triton.autotune(configs=_assign_configs(), key=["C", "BLOCK_D", "N"])(_assign_kernel)
# Tiles the interpreter runs (small, so that ragged token and cluster tiles show up in small tests).
_INTERPRETER_BLOCKS = {"BLOCK_N": 64, "BLOCK_C": 32}


@triton.jit
def _segment_mean_kernel(x_ptr, order_ptr, offsets_ptr, prev_ptr, cent_ptr, sizes_ptr,
                         stride_xb, stride_xh, stride_xn, stride_xd,
                         H, N, C, D,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mean of the rows of one cluster: rows order[offsets[c]:offsets[c+1]] of one (batch, head), in that order."""
    c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    bh64 = pid_bh.to(tl.int64)
    start = tl.load(offsets_ptr + bh64 * (C + 1) + c)
    end = tl.load(offsets_ptr + bh64 * (C + 1) + c + 1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    x_base = x_ptr + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        rows_ok = t0 + offs_t < end
        token = tl.load(order_ptr + bh64 * N + t0 + offs_t, mask=rows_ok, other=0).to(tl.int64)
        acc += tl.load(x_base + token[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                       mask=rows_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    count = end - start
    total = tl.sum(acc, axis=0)
    out = bh64 * C * D + c * D + offs_d
    previous = tl.load(prev_ptr + out, mask=d_ok, other=0.0)
    mean = tl.where(count > 0, total / tl.maximum(count, 1).to(tl.float32), previous)
    tl.store(cent_ptr + out, mean, mask=d_ok)
    tl.store(sizes_ptr + bh64 * C + c, count)


# ------------------------------------------------------------------------------------------------------------
# Validation and helpers
# ------------------------------------------------------------------------------------------------------------
def _check_x(x: torch.Tensor, where: str):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{where}: x must be a (batch, heads, tokens, head_dim) tensor, got {shape}; "
                         f"for the attention processors' (B, N, H, D) layout pass x.transpose(1, 2)")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{where}: x has dtype {x.dtype}; supported are float16, bfloat16 and float32")
    B, H, N, D = x.shape
    if min(B, H, N, D) == 0:
        raise ValueError(f"{where}: x has an empty dimension, shape {tuple(x.shape)}")
    return B, H, N, D


def _check_centroids(centroids: torch.Tensor, x: torch.Tensor, where: str, num_clusters: Optional[int] = None):
    B, H, N, D = x.shape
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 4 or tuple(centroids.shape[:2]) != (B, H) \
            or centroids.shape[3] != D:
        shape = tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids).__name__
        raise ValueError(f"{where}: centroids must have shape (B, H, C, D) = ({B}, {H}, C, {D}) to match x "
                         f"{tuple(x.shape)}, got {shape}")
    if num_clusters is not None and centroids.shape[2] != num_clusters:
        raise ValueError(f"{where}: centroids have {centroids.shape[2]} clusters but num_clusters={num_clusters}")
    if centroids.shape[2] == 0:
        raise ValueError(f"{where}: centroids have zero clusters")
    if not centroids.is_floating_point():
        raise TypeError(f"{where}: centroids must be floating point, got {centroids.dtype}")
    if centroids.device != x.device:
        raise ValueError(f"{where}: centroids are on {centroids.device} but x is on {x.device}")
    return centroids.shape[2]


def _check_num_clusters(num_clusters, n_tokens: int, where: str) -> int:
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"{where}: num_clusters must be a positive int, got {num_clusters!r}")
    if num_clusters > n_tokens:
        raise ValueError(f"{where}: num_clusters={num_clusters} exceeds the {n_tokens} tokens per head; "
                         f"use at most as many clusters as tokens")
    return num_clusters


def _use_triton(x: torch.Tensor, backend: str, where: str) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"{where}: backend must be one of {_BACKENDS}, got {backend!r}")
    runnable = x.is_cuda or (_INTERPRETED and x.device.type == "cpu")
    if backend == "triton" and not runnable:
        raise ValueError(f"{where}: the Triton kernel runs on CUDA tensors, or on CPU tensors only under "
                         f"TRITON_INTERPRET=1 (set before vidaccel.kernels.kmeans is imported); "
                         f"use backend='torch' here")
    return backend == "triton" or (backend == "auto" and runnable)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))  # tl.dot needs an inner dimension of at least 16


# ------------------------------------------------------------------------------------------------------------
# Assignment
# ------------------------------------------------------------------------------------------------------------
def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Nearest centroid of every token: labels (B, H, N) int32.

    x (B, H, N, D) float16/bfloat16/float32, any strides; centroids (B, H, C, D) floating point.
    """
    B, H, N, D = _check_x(x, "kmeans_assign")
    C = _check_centroids(centroids, x, "kmeans_assign")
    if not _use_triton(x, backend, "kmeans_assign"):
        return kmeans_assign_reference(x, centroids)
    return _assign_triton(x, centroids)


def _assign_triton(x, centroids, blocks: Optional[dict] = None, num_warps: int = 4, num_stages: int = 3):
    B, H, N, D = x.shape
    C = centroids.shape[2]
    if N >= 2**31 or B * H * C * D >= 2**31:
        raise ValueError(f"kmeans_assign: x {tuple(x.shape)} with {C} clusters overflows int32 indices")
    # 16-bit inputs: centroids in the same dtype so the dot runs on tensor cores; norms from those values.
    c_used = centroids.to(x.dtype).contiguous()
    c_norms = c_used.float().square().sum(-1).contiguous()
    labels = torch.empty((B, H, N), dtype=torch.int32, device=x.device)
    args = (x, c_used, c_norms, labels, *x.stride(), H, N, C, D)
    meta = dict(BLOCK_D=_block_d(D), IEEE_DOT=x.dtype == torch.float32)
    if blocks is None and (_INTERPRETED or not x.is_cuda):
        blocks = _INTERPRETER_BLOCKS
    if blocks is not None:
        grid = (triton.cdiv(N, blocks["BLOCK_N"]), B * H)
        _assign_kernel[grid](*args, **meta, **blocks, num_warps=num_warps, num_stages=num_stages)
    else:
        grid = lambda m: (triton.cdiv(N, m["BLOCK_N"]), B * H)  # noqa: E731
        _assign_kernel_tuned[grid](*args, **meta)
    return labels


def kmeans_assign_reference(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of ``kmeans_assign``: float32 ``||c||^2 - 2 x.c``, argmin (first index on ties)."""
    B, H, N, D = _check_x(x, "kmeans_assign_reference")
    C = _check_centroids(centroids, x, "kmeans_assign_reference")
    cent = centroids.float()
    c_norms = cent.square().sum(-1)
    labels = torch.empty((B, H, N), dtype=torch.int32, device=x.device)
    step = max(1, _REFERENCE_CHUNK_ELEMENTS // (B * H * C))
    for n0 in range(0, N, step):
        dots = torch.matmul(x[:, :, n0:n0 + step].float(), cent.transpose(-1, -2))
        labels[:, :, n0:n0 + step] = (c_norms[:, :, None, :] - 2.0 * dots).argmin(-1).to(torch.int32)
    return labels


# ------------------------------------------------------------------------------------------------------------
# Update
# ------------------------------------------------------------------------------------------------------------
_UPDATE_METHODS = ("index_put", "index_add", "sorted")


def kmeans_update(x: torch.Tensor, labels: torch.Tensor, num_clusters: int, previous_centroids: torch.Tensor, *,
                  method: str = "index_put") -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster means (B, H, C, D) float32 and sizes (B, H, C) int32; empty clusters keep previous_centroids.

    Labels must lie in [0, num_clusters) (not checked: that would synchronise with the host). ``method``: see the
    module docstring ("index_put" deterministic torch, "index_add" atomic torch, "sorted" sort + Triton sums).
    """
    B, H, N, D = _check_x(x, "kmeans_update")
    C = _check_num_clusters(num_clusters, N, "kmeans_update")
    _check_centroids(previous_centroids, x, "kmeans_update", num_clusters=C)
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (B, H, N):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"kmeans_update: labels must have shape (B, H, N) = {(B, H, N)}, got {shape}")
    if labels.dtype not in (torch.int32, torch.int64) or labels.device != x.device:
        raise TypeError(f"kmeans_update: labels must be int32/int64 on {x.device}, got {labels.dtype} on "
                        f"{labels.device}")
    if method not in _UPDATE_METHODS:
        raise ValueError(f"kmeans_update: method must be one of {_UPDATE_METHODS}, got {method!r}")
    if _sorted_update_runs(method, x):
        return _update_sorted(x, labels, C, previous_centroids)[:2]

    sums = torch.zeros((B * H * C, D), dtype=torch.float32, device=x.device)
    counts = torch.zeros((B * H * C,), dtype=torch.int32, device=x.device)
    heads_per_chunk = max(1, min(H, _UPDATE_CHUNK_ELEMENTS // (B * N * D)))
    batch_base = torch.arange(B, device=x.device, dtype=torch.int64)[:, None] * H
    for h0 in range(0, H, heads_per_chunk):
        h1 = min(H, h0 + heads_per_chunk)
        head_ids = torch.arange(h0, h1, device=x.device, dtype=torch.int64)[None, :]
        flat = (labels[:, h0:h1].to(torch.int64) + ((batch_base + head_ids) * C)[..., None]).reshape(-1)
        if x.dtype == torch.float32:
            rows = x[:, h0:h1].reshape(-1, D)  # a view where the layout allows
        else:  # one float32 copy, whatever the strides of x
            rows = torch.empty((B, h1 - h0, N, D), dtype=torch.float32, device=x.device)
            rows.copy_(x[:, h0:h1])
            rows = rows.view(-1, D)
        if method != "index_add":
            sums.index_put_((flat,), rows, accumulate=True)
        else:
            sums.index_add_(0, flat, rows)
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))  # integer sums: exact either way
    sizes = counts.view(B, H, C)
    means = sums.view(B, H, C, D) / sizes.clamp(min=1).unsqueeze(-1).to(torch.float32)
    centroids = torch.where((sizes > 0).unsqueeze(-1), means, previous_centroids.to(torch.float32))
    return centroids, sizes


def _sorted_update_runs(method: str, x: torch.Tensor) -> bool:
    return method == "sorted" and (x.is_cuda or (_INTERPRETED and x.device.type == "cpu"))


def _update_sorted(x, labels, C, previous_centroids, block_rows: int = 64):
    """Centroids, sizes, and the stable sort order and cluster offsets of ``labels`` that the sums walk."""
    B, H, N, D = x.shape
    sorted_labels, order = torch.sort(labels, dim=-1, stable=True)
    boundaries = torch.arange(C + 1, device=x.device, dtype=labels.dtype).expand(B, H, C + 1).contiguous()
    offsets = torch.searchsorted(sorted_labels, boundaries, out_int32=True)
    offsets[..., -1] = N  # out-of-range labels would otherwise drop tokens; keep sizes summing to N
    order = order.contiguous()
    previous = previous_centroids.to(torch.float32).contiguous()
    centroids = torch.empty((B, H, C, D), dtype=torch.float32, device=x.device)
    sizes = torch.empty((B, H, C), dtype=torch.int32, device=x.device)
    _segment_mean_kernel[(C, B * H)](x, order, offsets, previous, centroids, sizes, *x.stride(), H, N, C, D,
                                     BLOCK_T=block_rows, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return centroids, sizes, order, offsets


def kmeans_inertia(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Sum of squared distances of every token to its cluster's centroid, per (batch, head): (B, H) float32."""
    B, H, N, D = _check_x(x, "kmeans_inertia")
    _check_centroids(centroids, x, "kmeans_inertia")
    assigned = torch.gather(centroids.float(), 2, labels.to(torch.int64).unsqueeze(-1).expand(B, H, N, D))
    return (x.float() - assigned).square().sum(dim=(-1, -2))


# ------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------
def _random_token_init(x: torch.Tensor, num_clusters: int, seed: int) -> torch.Tensor:
    """Distinct random tokens of each (batch, head) as initial centroids, reproducible for a seed and device."""
    B, H, N, D = x.shape
    gen = torch.Generator(device=x.device)
    gen.manual_seed(int(seed))
    keys = torch.rand((B, H, N), generator=gen, device=x.device)
    picks = keys.topk(num_clusters, dim=-1, sorted=True).indices  # distinct by construction
    return torch.gather(x, 2, picks.unsqueeze(-1).expand(B, H, num_clusters, D)).to(torch.float32)


def batched_kmeans(x: torch.Tensor, num_clusters: int, *, iterations: int,
                   init_centroids: Optional[torch.Tensor] = None, seed: int = 0, stop_when_stable: bool = False,
                   update_method: str = "index_put", backend: str = "auto") -> KMeansResult:
    """Lloyd's k-means of every (batch, head) of x (B, H, N, D) over head_dim.

    Cold call: ``init_centroids=None``, e.g. ``iterations=50, stop_when_stable=True``. Warm-started call: pass
    the previous centroids and a small fixed ``iterations`` (e.g. 2); it never synchronises with the host.
    ``update_method`` is kmeans_update's ``method``.
    """
    B, H, N, D = _check_x(x, "batched_kmeans")
    C = _check_num_clusters(num_clusters, N, "batched_kmeans")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"batched_kmeans: iterations must be a positive int, got {iterations!r}")
    _use_triton(x, backend, "batched_kmeans")  # validates backend early
    if init_centroids is None:
        centroids = _random_token_init(x, C, seed)
    else:
        _check_centroids(init_centroids, x, "batched_kmeans", num_clusters=C)
        centroids = init_centroids.to(torch.float32)

    previous_labels = None
    ran = 0
    labels = sizes = order = offsets = None
    sorted_update = _sorted_update_runs(update_method, x)
    for _ in range(iterations):
        labels = kmeans_assign(x, centroids, backend=backend)
        if sorted_update:
            centroids, sizes, order, offsets = _update_sorted(x, labels, C, centroids)
        else:
            centroids, sizes = kmeans_update(x, labels, C, centroids, method=update_method)
        ran += 1
        if stop_when_stable and previous_labels is not None and ran % STABILITY_CHECK_EVERY == 0 \
                and torch.equal(labels, previous_labels):  # host sync, only every few cold iterations
            break
        previous_labels = labels
    return KMeansResult(labels=labels, centroids=centroids, sizes=sizes, iterations=ran, order=order,
                        offsets=offsets)
