"""Tile-granular selection for Sparse VideoGen2 (``SVG2Attention(layout="tiles")``).

SVG2's semantic permutation puts similar tokens next to each other. This module then selects at the granularity
of fixed tiles of the permuted sequence (``block_m`` query rows x ``block_n`` key rows) instead of exact clusters:
a tile's centroid is the mean of its tokens, and each query tile keeps the key tiles that carry ``top_p`` of the
estimated mass (`svg2_selection.select_key_clusters` with tiles as clusters). The result is an ordinary
`BlockLayout` (one group per batch item and head), so the fixed-block kernel runs it with TMA tiles and no gathered
rows: the variable-block kernel pays for exact cluster boundaries with 1.5-2x more time per attended pair
(benchmarks/RESULTS.md). The price is coarser selection: a tile may hold the tail of one cluster and the head of
the next. To make neighbouring clusters alike, clusters can first be ordered along the first principal direction
of their centroids (`order_clusters`), so a tile's clusters tend to be close in head_dim space.

Everything runs as torch ops on the device without host synchronisation.
"""

from __future__ import annotations

import torch

from ..kernels._block_layout import BlockLayout
from .svg2_selection import select_key_clusters

__all__ = ["TILE_M", "TILE_N", "principal_order", "reorder_clusters", "tile_layout", "tile_means"]

TILE_M = 128  # query rows per tile: the kernel's query block
TILE_N = 64  # key rows per tile: the kernel's fastest key tile (two CTAs per SM on Hopper)
_POWER_ITERATIONS = 8


def principal_order(centroids: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(B, H, C, D) centroids, (B, H, C) cluster sizes -> (B, H, C) int64 cluster indices sorted by their
    projection on the first principal direction of the size-weighted centroids (power iteration from a fixed
    start: deterministic). Empty clusters go wherever their stale centroid projects; they hold no tokens."""
    weights = sizes.float().unsqueeze(-1)
    mean = (centroids * weights).sum(-2, keepdim=True) / weights.sum(-2, keepdim=True).clamp_min(1.0)
    centred = (centroids - mean) * weights.sqrt()
    direction = torch.ones(centroids.shape[:2] + centroids.shape[-1:], device=centroids.device,
                           dtype=centroids.dtype).unsqueeze(-1)  # (B, H, D, 1)
    for _ in range(_POWER_ITERATIONS):
        direction = centred.transpose(-1, -2) @ (centred @ direction)
        direction = direction / direction.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    projection = (centroids @ direction).squeeze(-1)  # (B, H, C)
    return torch.argsort(projection, dim=-1, stable=True)


def reorder_clusters(perm, cluster_order: torch.Tensor):
    """The same clusters laid out in ``cluster_order`` (B, H, C): cluster ``cluster_order[..., i]`` becomes the
    i-th contiguous segment; tokens keep their order inside each cluster."""
    from ..kernels.cluster_permute import ClusterPermutation

    order, offsets, sizes = perm.order, perm.offsets, perm.sizes
    N = order.shape[-1]
    new_sizes = torch.gather(sizes, -1, cluster_order)
    new_offsets = torch.nn.functional.pad(torch.cumsum(new_sizes, -1, dtype=torch.int32), (1, 0))
    new_start = torch.empty_like(sizes).scatter_(-1, cluster_order, new_offsets[..., :-1])  # per old cluster
    position = torch.arange(N, device=order.device, dtype=offsets.dtype).expand(order.shape).contiguous()
    cluster = torch.searchsorted(offsets[..., 1:].contiguous(), position, right=True).clamp_max(sizes.shape[-1] - 1)
    target = torch.gather(new_start, -1, cluster) + (position - torch.gather(offsets, -1, cluster))
    new_order = torch.empty_like(order).scatter_(-1, target.long(), order)
    return ClusterPermutation(order=new_order, offsets=new_offsets, sizes=new_sizes)


def tile_means(x: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, D) -> float32 mean of each tile of ``tile`` consecutive tokens (B, H, T, D) and the tile sizes
    (T,) int32 (the last tile may be ragged)."""
    B, H, N, D = x.shape
    tiles = -(-N // tile)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, tiles * tile - N)).view(B, H, tiles, tile, D)
    sizes = torch.clamp(N - torch.arange(tiles, device=x.device, dtype=torch.int32) * tile, max=tile)
    return padded.sum(-2) / sizes.view(1, 1, tiles, 1).float(), sizes


def tile_layout(qp: torch.Tensor, kp: torch.Tensor, *, top_p: float, min_kept_fraction: float,
                block_m: int = TILE_M, block_n: int = TILE_N) -> tuple[BlockLayout, torch.Tensor]:
    """Permuted q, k (B, H, N, D) -> the block layout of the kept (query tile, key tile) pairs, one group per
    (batch item, head), and its density per (batch item, head) (B, H) float32, on the device."""
    B, H, Nq, D = qp.shape
    Nk = kp.shape[2]
    q_means, _ = tile_means(qp, block_m)
    k_means, k_sizes = tile_means(kp, block_n)
    kept = select_key_clusters(q_means, k_means, k_sizes.expand(B, H, -1), top_p=top_p,
                               min_kept_fraction=min_kept_fraction)  # (B, H, Tq, Tk)
    nq, nk = kept.shape[-2:]
    counts = kept.sum(-1, dtype=torch.int32).view(B * H, nq)
    # Kept key tiles first, in increasing index order; entries past the count are padding the kernel never reads.
    indices = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True).to(torch.int32).view(B * H, nq, nk)
    layout = BlockLayout(indices.contiguous(), counts.contiguous(), block_m, block_n, q_len=Nq, kv_len=Nk)
    q_sizes = torch.clamp(Nq - torch.arange(nq, device=qp.device) * block_m, max=block_m).float()
    density = (kept.float() * k_sizes.float()).sum(-1).mul(q_sizes).sum(-1) / (Nq * Nk)
    return layout, density
