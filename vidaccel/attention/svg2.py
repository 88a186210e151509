"""`SVG2Attention`: Sparse VideoGen2's semantic-aware permutation as a vidaccel attention method (DESIGN.md §3).

One sparse self-attention product over the video tokens:
1. k-means of Q and of K per (batch item, head) over head_dim, warm-started from this layer's centroids of the
   previous step (same CFG branch, same batch item); the first sparse call of a generation runs cold;
2. q, k, v permuted so every cluster's tokens are contiguous;
3. per query cluster, the key clusters that carry `top_p` of the estimated attention mass (`svg2_selection`);
4. variable-block sparse attention over the selected cluster ranges;
5. the output (and its log-sum-exp, for the joint-text merge) put back in the original token order.

Unlike the authors' code this runs any batch size and both CFG branches (the kernels take (B, H, ...) tensors and
the centroids are kept per batch item), and never synchronises with the host in the steady state.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..kernels_backend import use_triton_kernels
from ..method import MethodConfig
from .sparse_base import SparseAttentionMethod, resolve_warmup
from .svg2_selection import select_key_clusters

# Per model family: (query clusters, key clusters) at full size. The authors run Wan 2.1 with 300 query and 1000
# key clusters and HunyuanVideo with 400 / 1000; CogVideoX (not in their paper) has about half the tokens of a
# Wan 480p video, so it gets fewer query clusters. Counts are clamped to the token count for small inputs.
FAMILY_DEFAULTS = {"wan": (300, 1000), "hunyuan": (400, 1000), "cogvideox": (200, 1000)}
_FALLBACK_CLUSTERS = (300, 1000)


@dataclasses.dataclass
class _Centroids:
    """k-means state of one (transformer, layer, CFG branch): per batch item and head."""

    shape: tuple  # (B, H, N, D, Cq, Ck) the centroids were computed for
    query: torch.Tensor  # (B, H, Cq, D) float32
    key: torch.Tensor  # (B, H, Ck, D) float32


@dataclasses.dataclass
class SVG2Step:
    """Everything one sparse product computed (returned by `SVG2AttentionMethod.sparse_step` for benchmarks and
    tests)."""

    out: torch.Tensor  # (B, N, H, D) original token order
    lse: Optional[torch.Tensor]  # (B, H, N) float32 natural log, or None
    selected: torch.Tensor  # (B, H, Cq, Ck) bool
    q_offsets: torch.Tensor  # (B, H, Cq + 1) int32
    k_offsets: torch.Tensor  # (B, H, Ck + 1) int32
    warm: bool
    query_iterations: int  # k-means iterations run (a cold call may stop early)
    key_iterations: int


def _permutation(result, num_clusters: int):
    """The clusters of a k-means result made contiguous: the sorted centroid update has already sorted the final
    labels, so reuse its order and offsets (one sort less per clustering); otherwise sort them here."""
    from ..kernels.cluster_permute import ClusterPermutation, cluster_permutation

    if result.order is None:
        return cluster_permutation(result.labels, num_clusters)
    return ClusterPermutation(order=result.order, offsets=result.offsets, sizes=result.sizes)


class SVG2AttentionMethod(SparseAttentionMethod):
    def __init__(self, config: "SVG2Attention"):
        super().__init__(config.dense_warmup, config.dense_layers)
        self.config = config
        # the family's defaults replace these at install unless the config names counts
        self.query_clusters = config.query_clusters or _FALLBACK_CLUSTERS[0]
        self.key_clusters = config.key_clusters or _FALLBACK_CLUSTERS[1]
        self._centroids: dict[tuple, _Centroids] = {}
        # (transformer, layer) -> [sum of per-call mean densities (device tensor), sparse calls]
        self._density: dict[tuple[str, int], list] = {}
        self.kmeans_iterations = 0  # Lloyd iterations run (query and key clusterings each count)
        self.cold_starts = 0
        self.warm_starts = 0

    def install(self, adapter) -> None:
        query, key = FAMILY_DEFAULTS.get(adapter.family, _FALLBACK_CLUSTERS)
        self.query_clusters = query if self.config.query_clusters is None else self.config.query_clusters
        self.key_clusters = key if self.config.key_clusters is None else self.config.key_clusters
        super().install(adapter)

    def on_new_generation(self, generation: int) -> None:
        self._centroids.clear()  # centroids of another video would be a poor start; cold k-means again

    # -- one sparse product -------------------------------------------------------------------------------
    def sparse_video_attention(self, q, k, v, video_layout, call, need_lse):
        state_key = (call.transformer_name, call.layer_index, call.context.branch)
        step = self.sparse_step(q, k, v, state_key, need_lse)
        self._record_density(call.transformer_name, call.layer_index, step)
        return step.out, step.lse

    def sparse_step(self, q, k, v, state_key=("", 0, "default"), need_lse=False, *,
                    attention_kernel=None) -> SVG2Step:
        """q, k, v (B, N, H, D) video tokens -> SVG2Step; updates the k-means state stored under `state_key`.

        ``attention_kernel`` replaces the sparse product of the permuted tokens (same signature as
        ``varblock_sparse_attention``, which it receives unpermuted with ``q_order`` / ``k_order`` when the
        kernels' key mode is "indexed"); None picks the variable-block kernel, or its reference off the GPU.
        Benchmarks pass a stand-in to time everything else this step runs."""
        from ..kernels.cluster_permute import permute_qkv, unpermute_tokens
        from ..kernels.kmeans import batched_kmeans

        if q.shape != k.shape or q.shape != v.shape:
            raise ValueError(f"SVG2 self-attention needs q, k, v of one shape, got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        B, N, H, D = q.shape
        num_q, num_k = min(self.query_clusters, N), min(self.key_clusters, N)
        kernels = use_triton_kernels(q)
        backend = "triton" if kernels else "torch"
        shape = (B, H, N, D, num_q, num_k)
        previous = self._centroids.get(state_key)
        warm = previous is not None and previous.shape == shape
        iterations = self.config.warm_iterations if warm else self.config.first_iterations
        q_bhnd, k_bhnd = q.transpose(1, 2), k.transpose(1, 2)
        # a cold call may stop early once the labels settle (it syncs with the host every few iterations, once
        # per layer and generation); warm calls run their fixed few iterations without a sync
        # The sort + segment-sum centroid update: deterministic like index_put and, on an H100, 2x (Wan 480p) to
        # 4.4x (Wan 14B 720p) faster warm k-means (results/kmeans_2026-11-27.json); plain torch off the GPU.
        q_km = batched_kmeans(q_bhnd, num_q, iterations=iterations, seed=self.config.seed, backend=backend,
                              init_centroids=previous.query if warm else None, stop_when_stable=not warm,
                              update_method="sorted")
        k_km = batched_kmeans(k_bhnd, num_k, iterations=iterations, seed=self.config.seed + 1, backend=backend,
                              init_centroids=previous.key if warm else None, stop_when_stable=not warm,
                              update_method="sorted")
        self._centroids[state_key] = _Centroids(shape, q_km.centroids, k_km.centroids)
        self.kmeans_iterations += q_km.iterations + k_km.iterations
        if warm:
            self.warm_starts += 1
        else:
            self.cold_starts += 1

        q_perm = _permutation(q_km, num_q)
        k_perm = _permutation(k_km, num_k)
        selected = select_key_clusters(q_km.centroids, k_km.centroids, k_perm.sizes, top_p=self.config.top_p,
                                       min_kept_fraction=self.config.min_kept_fraction)
        from ..kernels import varblock_attention

        if attention_kernel is not None:
            attention = attention_kernel
        elif kernels:
            attention = varblock_attention.varblock_sparse_attention
        else:
            attention = varblock_attention.varblock_sparse_attention_reference
        if kernels and varblock_attention.DEFAULT_KEY_MODE == "indexed":
            # The kernel gathers query and key rows through the cluster orders and writes the output back in
            # token order: no permuted copies of q, k, v and no inverse permutation.
            result = attention(q_bhnd, k_bhnd, v.transpose(1, 2), q_perm.offsets, k_perm.offsets, selected,
                               return_lse=need_lse, q_order=q_perm.order, k_order=k_perm.order)
            out_t, lse = result if need_lse else (result, None)
            out = out_t.transpose(1, 2).contiguous()  # (B, N, H, D); already contiguous for dense inputs
        else:
            qp, kp, vp = permute_qkv(q, k, v, q_perm.order, k_perm.order, backend=backend)
            result = attention(qp, kp, vp, q_perm.offsets, k_perm.offsets, selected, return_lse=need_lse)
            out_p, lse_p = result if need_lse else (result, None)
            out = unpermute_tokens(out_p, q_perm.order, backend=backend)
            lse = None
            if lse_p is not None:  # back to the original token order: lse[order[p]] = lse_p[p]
                lse = torch.empty_like(lse_p).scatter_(-1, q_perm.order, lse_p)
        return SVG2Step(out, lse, selected, q_perm.offsets, k_perm.offsets, warm, q_km.iterations,
                        k_km.iterations)

    def _record_density(self, transformer_name: str, layer_index: int, step: SVG2Step) -> None:
        from ..kernels.varblock_attention import varblock_density

        density = varblock_density(step.q_offsets, step.k_offsets, step.selected).mean()  # stays on device
        entry = self._density.setdefault((transformer_name, layer_index), [torch.zeros_like(density), 0])
        entry[0] += density
        entry[1] += 1

    # -- report -------------------------------------------------------------------------------------------
    def stats(self):
        out = super().stats()
        per_layer = {}
        for (name, layer), (total, count) in sorted(self._density.items()):
            per_layer[f"{name}.{layer}"] = float(total) / count  # host sync here, in the report only
        out["density"] = sum(per_layer.values()) / len(per_layer) if per_layer else None
        out["density_per_layer"] = per_layer
        out["kmeans_iterations"] = self.kmeans_iterations
        out["kmeans_cold_starts"] = self.cold_starts
        out["kmeans_warm_starts"] = self.warm_starts
        out["clusters"] = {"query": self.query_clusters, "key": self.key_clusters}
        out["top_p"] = self.config.top_p
        return out


@dataclasses.dataclass(frozen=True)
class SVG2Attention(MethodConfig):
    """Sparse VideoGen2. `top_p`: estimated attention mass each query cluster keeps; `query_clusters` /
    `key_clusters`: k-means clusters per head (None: per-model default, Wan 300 / 1000; clamped to the token
    count); `first_iterations` / `warm_iterations`: Lloyd iterations of the first sparse call of a generation and
    of later, warm-started calls; `dense_warmup`: a fraction (< 1) or a count of the first steps run dense (the
    authors: 20%); `dense_layers`: first layers kept dense; `min_kept_fraction`: floor on the fraction of key
    clusters each query cluster keeps (the authors: 0.1); `seed`: k-means initialisation."""

    role = "attention"
    name = "svg2"

    top_p: float = 0.9
    query_clusters: Optional[int] = None
    key_clusters: Optional[int] = None
    first_iterations: int = 50
    warm_iterations: int = 2
    dense_warmup: float = 0.2
    dense_layers: int = 1
    min_kept_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 keeps every key: dense), got {self.top_p!r}")
        for name in ("query_clusters", "key_clusters"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None (per-model default), got {value!r}")
        for name in ("first_iterations", "warm_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int (k-means iterations), got {value!r}")
        if self.dense_warmup < 0 or (isinstance(self.dense_warmup, float) and self.dense_warmup >= 1
                                     and not float(self.dense_warmup).is_integer()):
            raise ValueError(f"dense_warmup must be a fraction in [0, 1) or a step count, got {self.dense_warmup}")
        if isinstance(self.dense_layers, bool) or not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ValueError(f"dense_layers must be an int >= 0, got {self.dense_layers!r}")
        if not 0 <= self.min_kept_fraction <= 1:
            raise ValueError(f"min_kept_fraction must be in [0, 1], got {self.min_kept_fraction}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    def dense_steps(self, num_steps: int) -> int:
        """How many of `num_steps` steps run dense."""
        return resolve_warmup(self.dense_warmup, num_steps)

    def build(self) -> SVG2AttentionMethod:
        return SVG2AttentionMethod(self)
