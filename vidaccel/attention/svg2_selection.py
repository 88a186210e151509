"""Which key clusters each query cluster attends to in Sparse VideoGen2 (DESIGN.md §3).

From the k-means centroids alone: the score of a (query cluster, key cluster) pair is `Qc·Kc * scale`; a key
cluster of `s` tokens whose tokens all sat at its centroid would carry `s * exp(score)` of the row's softmax
mass, so the estimated attention mass of key cluster j for query cluster i is
`sizes[j] * exp(score[i, j]) / sum_j' sizes[j'] * exp(score[i, j'])`. Per query cluster, key clusters are
kept in descending score order (most mass per token first, so the fewest tokens reach the target) until the
kept mass reaches `top_p`, and never fewer than `min_kept_fraction` of the key clusters (at least one).

Pure torch on the device, no host synchronisation: the result feeds the variable-block attention kernel.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def centroid_scores(q_centroids: torch.Tensor, k_centroids: torch.Tensor,
                    sm_scale: Optional[float] = None) -> torch.Tensor:
    """(B, H, Cq, D) x (B, H, Ck, D) -> (B, H, Cq, Ck) float32 scaled dot products (default scale 1/sqrt(D))."""
    if q_centroids.dim() != 4 or k_centroids.dim() != 4:
        raise ValueError(f"centroids must be (batch, heads, clusters, head_dim), got {tuple(q_centroids.shape)} "
                         f"and {tuple(k_centroids.shape)}")
    if q_centroids.shape[:2] != k_centroids.shape[:2] or q_centroids.shape[-1] != k_centroids.shape[-1]:
        raise ValueError(f"query and key centroids disagree on batch/heads/head_dim: {tuple(q_centroids.shape)} "
                         f"vs {tuple(k_centroids.shape)}")
    scale = 1.0 / math.sqrt(q_centroids.shape[-1]) if sm_scale is None else float(sm_scale)
    return torch.matmul(q_centroids.float(), k_centroids.float().transpose(-1, -2)) * scale


def cluster_mass(scores: torch.Tensor, k_sizes: torch.Tensor) -> torch.Tensor:
    """Size-weighted softmax over key clusters: (B, H, Cq, Ck) scores, (B, H, Ck) token counts -> estimated
    attention mass per key cluster, each row summing to 1. Empty key clusters get mass 0."""
    if k_sizes.shape != scores.shape[:2] + scores.shape[-1:]:
        raise ValueError(f"key cluster sizes {tuple(k_sizes.shape)} do not match scores {tuple(scores.shape)} "
                         "(expected (batch, heads, key_clusters))")
    log_sizes = torch.log(k_sizes.float()).unsqueeze(-2)  # log 0 = -inf: empty clusters carry nothing
    return torch.softmax(scores + log_sizes, dim=-1)


def min_kept_clusters(num_key_clusters: int, min_kept_fraction: float) -> int:
    """Floor on the key clusters each query cluster keeps: ceil(fraction * Ck), at least 1, at most Ck."""
    return max(1, min(num_key_clusters, math.ceil(min_kept_fraction * num_key_clusters - 1e-9)))


def select_key_clusters(q_centroids: torch.Tensor, k_centroids: torch.Tensor, k_sizes: torch.Tensor, *,
                        top_p: float, min_kept_fraction: float = 0.0,
                        sm_scale: Optional[float] = None) -> torch.Tensor:
    """(B, H, Cq, Ck) bool: query cluster i attends to the tokens of key cluster j.

    Key clusters are ranked by score (ties: lower cluster index first) and kept while the mass of the clusters
    ranked before them is still below `top_p`; the first `min_kept_clusters` of the ranking are always kept.
    `top_p >= 1` keeps everything (exact dense attention, not subject to rounding in the cumulative sum).
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0.0 <= min_kept_fraction <= 1.0:
        raise ValueError(f"min_kept_fraction must be in [0, 1], got {min_kept_fraction}")
    scores = centroid_scores(q_centroids, k_centroids, sm_scale)
    if top_p >= 1.0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    mass = cluster_mass(scores, k_sizes)
    num_key = scores.shape[-1]
    # stable sort: equal scores keep index order, so ties resolve the same way on every backend
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranked_mass = torch.gather(mass, -1, order)
    # exclusive prefix sum: the mass of the clusters ranked before each one
    mass_before = torch.nn.functional.pad(torch.cumsum(ranked_mass, dim=-1)[..., :-1], (1, 0))
    rank = torch.arange(num_key, device=scores.device)
    keep_ranked = (mass_before < top_p) | (rank < min_kept_clusters(num_key, min_kept_fraction))
    return torch.zeros_like(keep_ranked).scatter_(-1, order, keep_ranked)


def kept_mass(q_centroids: torch.Tensor, k_centroids: torch.Tensor, k_sizes: torch.Tensor,
              selected: torch.Tensor, sm_scale: Optional[float] = None) -> torch.Tensor:
    """(B, H, Cq) estimated attention mass the selection keeps (for tests and diagnostics)."""
    mass = cluster_mass(centroid_scores(q_centroids, k_centroids, sm_scale), k_sizes)
    return (mass * selected).sum(-1)
