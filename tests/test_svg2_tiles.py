"""SVG2 with tile-granular selection (`SVG2Attention(layout="tiles")`): cluster reordering, tile means, the tile
layout, and the method on direct calls and the tiny pipelines."""

import os
import subprocess
import sys

import pytest
import torch

import vidaccel
from vidaccel.attention import svg2
from vidaccel.attention.svg2_selection import select_key_clusters
from vidaccel.attention.svg2_tiles import principal_order, reorder_clusters, tile_layout, tile_means
from vidaccel.kernels.block_sparse_attention import block_sparse_attention_reference
from vidaccel.kernels.cluster_permute import cluster_permutation
from vidaccel.testing import KINDS, tiny_call_kwargs

SIZE = dict(height=128, width=128, num_frames=17)
CLUSTERS = dict(query_clusters=8, key_clusters=16, first_iterations=4)


@pytest.fixture(autouse=True)
def torch_reference_path(monkeypatch):
    monkeypatch.setattr(svg2, "use_triton_kernels", lambda x: False)


def _labels(B, H, N, C, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B, H, N), generator=g, dtype=torch.int32)
    labels[0, 0, :] = torch.where(labels[0, 0] == 2, 3, labels[0, 0])  # an empty cluster
    return labels


@pytest.mark.parametrize("N,C", [(50, 7), (300, 40), (17, 17)])
def test_reorder_clusters_keeps_clusters_contiguous_in_the_new_order(N, C):
    B, H = 2, 3
    labels = _labels(B, H, N, C, seed=N)
    perm = cluster_permutation(labels, C)
    cluster_order = torch.stack([torch.randperm(C, generator=torch.Generator().manual_seed(i))
                                 for i in range(B * H)]).view(B, H, C)
    new = reorder_clusters(perm, cluster_order)
    assert torch.equal(new.order.sort(-1).values, torch.arange(N).expand(B, H, N))  # still a permutation
    assert torch.equal(new.sizes, torch.gather(perm.sizes, -1, cluster_order))
    assert torch.equal(new.offsets[..., -1], torch.full((B, H), N, dtype=new.offsets.dtype))
    permuted_labels = torch.gather(labels.long(), -1, new.order)
    for b in range(B):
        for h in range(H):
            for i in range(C):
                lo, hi = int(new.offsets[b, h, i]), int(new.offsets[b, h, i + 1])
                segment = permuted_labels[b, h, lo:hi]
                assert (segment == cluster_order[b, h, i]).all()
                # tokens keep their original order inside a cluster
                assert torch.equal(new.order[b, h, lo:hi], new.order[b, h, lo:hi].sort().values)


def test_principal_order_follows_the_main_axis_and_is_deterministic():
    t = torch.linspace(-3, 3, 12)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(0)), dim=0)
    centroids = t[:, None] * direction + 0.01 * torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    shuffle = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    centroids = centroids[shuffle].view(1, 1, 12, 16)
    sizes = torch.full((1, 1, 12), 5, dtype=torch.int32)
    order = principal_order(centroids, sizes)
    along = t[shuffle][order[0, 0]]
    assert torch.all(along[1:] > along[:-1]) or torch.all(along[1:] < along[:-1])
    assert torch.equal(order, principal_order(centroids, sizes))


def test_tile_means_with_a_ragged_last_tile():
    x = torch.randn(2, 3, 70, 8)
    means, sizes = tile_means(x, 32)
    assert sizes.tolist() == [32, 32, 6]
    torch.testing.assert_close(means[:, :, 1], x[:, :, 32:64].mean(2))
    torch.testing.assert_close(means[:, :, 2], x[:, :, 64:].mean(2))


@pytest.mark.parametrize("N", [128 * 3, 300])
def test_tile_layout_is_the_tile_selection_with_its_density(N):
    g = torch.Generator().manual_seed(N)
    qp, kp = torch.randn(2, 2, N, 16, generator=g), torch.randn(2, 2, N, 16, generator=g)
    layout, density = tile_layout(qp, kp, top_p=0.6, min_kept_fraction=0.1, block_m=128, block_n=64)
    q_means, _ = tile_means(qp, 128)
    k_means, k_sizes = tile_means(kp, 64)
    kept = select_key_clusters(q_means, k_means, k_sizes.expand(2, 2, -1), top_p=0.6, min_kept_fraction=0.1)
    assert layout.num_groups == 4 and (layout.block_m, layout.block_n) == (128, 64)
    assert torch.equal(layout.block_mask(), kept.view(4, *kept.shape[-2:]))
    assert 0 < float(density.min()) and float(density.max()) < 1
    assert float(density.mean()) == pytest.approx(layout.density, rel=1e-6)


def test_tiles_at_top_p_one_equal_dense_and_below_it_are_the_tile_masked_attention():
    g = torch.Generator().manual_seed(3)
    B, N, H, D = 2, 260, 2, 16
    q, k, v = (torch.randn(B, N, H, D, generator=g) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    full = vidaccel.SVG2Attention(layout="tiles", top_p=1.0, **CLUSTERS).build().sparse_step(q, k, v)
    torch.testing.assert_close(full.out, dense, atol=1e-5, rtol=1e-5)

    seen = {}

    def reference(qp, kp, vp, layout, return_lse=False):
        seen["args"] = (qp, kp, vp, layout)
        return block_sparse_attention_reference(qp, kp, vp, layout, return_lse=return_lse)

    method = vidaccel.SVG2Attention(layout="tiles", top_p=0.5, **CLUSTERS).build()
    step = method.sparse_step(q, k, v, need_lse=True, attention_kernel=reference)
    assert seen["args"][3].num_groups == B * H
    assert float(step.density.mean()) < 1 and step.selected is None
    gathered = vidaccel.SVG2Attention(layout="tiles", top_p=0.5, **CLUSTERS).build().sparse_step(q, k, v,
                                                                                                  need_lse=True)
    torch.testing.assert_close(gathered.out, step.out, atol=1e-5, rtol=1e-5)  # gather path == reference kernel
    torch.testing.assert_close(gathered.lse, step.lse, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(step.lse).all()


def test_permuted_tokens_are_contiguous_clusters_in_principal_order():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 200, 2, 16, generator=g) for _ in range(3))
    seen = {}

    def capture(qp, kp, vp, layout, return_lse=False):
        seen["qp"], seen["kp"] = qp, kp
        return block_sparse_attention_reference(qp, kp, vp, layout, return_lse=return_lse)

    method = vidaccel.SVG2Attention(layout="tiles", top_p=0.5, **CLUSTERS).build()
    method.sparse_step(q, k, v, attention_kernel=capture)
    # every permuted row is one of the original rows of its head, each used once
    for x, xp in ((q, seen["qp"]), (k, seen["kp"])):
        original = x.transpose(1, 2)
        for h in range(2):
            match = (xp[0, h][:, None, :] == original[0, h][None, :, :]).all(-1)
            assert torch.equal(match.sum(0), torch.ones(200, dtype=torch.long))


def latents(pipe, kind, steps=2, batch=2):
    call = {**tiny_call_kwargs(kind, steps=steps, batch_size=batch, cfg=True), **SIZE, "output_type": "latent"}
    return pipe(**call).frames


@pytest.mark.parametrize("kind", KINDS)
def test_tiles_on_the_tiny_pipelines_batch_two_cfg_and_remove_restores(kind, tiny_pipelines):
    pipe = tiny_pipelines[kind]
    dense = latents(pipe, kind)
    preset = vidaccel.Preset(attention=vidaccel.SVG2Attention(layout="tiles", top_p=0.5, dense_warmup=0,
                                                              dense_layers=1, **CLUSTERS), name="svg2-tiles")
    with vidaccel.apply(pipe, preset) as handle:
        sparse = latents(pipe, kind)
        stats = handle.stats()["attention"]
    assert stats["layout"] == "tiles" and stats["kmeans_cold_starts"] > 0  # Wan 2.2: one step per expert
    assert 0 < stats["density"] <= 1
    assert torch.isfinite(sparse).all() and sparse.shape == dense.shape
    torch.testing.assert_close(latents(pipe, kind), dense, atol=0, rtol=0)  # removed: the stock pipeline again


def test_layout_validation():
    with pytest.raises(ValueError, match="layout must be 'clusters'"):
        vidaccel.SVG2Attention(layout="blocks")


_INTERPRETER_SCRIPT = r"""
import torch
import vidaccel
import vidaccel.attention.svg2 as svg2
torch.manual_seed(0)
q, k, v = (torch.randn(2, 200, 2, 32) for _ in range(3))
config = vidaccel.SVG2Attention(layout="tiles", top_p=0.6, query_clusters=4, key_clusters=6, first_iterations=2)
assert svg2.use_triton_kernels(q)
fast = config.build().sparse_step(q, k, v, need_lse=True)
svg2.use_triton_kernels = lambda x: False
ref = config.build().sparse_step(q, k, v, need_lse=True)
assert torch.equal(fast.layout.block_mask(), ref.layout.block_mask()), "selection differs"
torch.testing.assert_close(fast.out, ref.out, atol=1e-4, rtol=1e-4)
torch.testing.assert_close(fast.lse, ref.lse, atol=1e-4, rtol=1e-4)
print("ok", float(fast.density.mean()))
"""


def test_triton_interpreter_path_matches_torch_path():
    """The block-sparse kernel (Triton interpreter) on the tile layout gives the gather path's product."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
