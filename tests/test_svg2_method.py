"""Sparse VideoGen2 as a vidaccel method: on the tiny pipelines (all kinds, batch 2, CFG) and on direct calls."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import vidaccel
from vidaccel.attention import svg2
from vidaccel.attention.processors import AttentionCall, sdpa_bshd
from vidaccel.context import StepContext
from vidaccel.kernels.varblock_attention import varblock_token_mask
from vidaccel.layout import TokenLayout
from vidaccel.testing import KINDS, tiny_call_kwargs

# latent 5 x 16 x 16 -> 5 x 8 x 8 = 320 video tokens for the Wan kinds: enough for a few dozen clusters
SIZE = dict(height=128, width=128, num_frames=17)
CLUSTERS = dict(query_clusters=8, key_clusters=16, first_iterations=4)
# transformer calls per step with CFG: CogVideoX batches both branches into one call
CALLS_PER_STEP = {"cogvideox": 1}


@pytest.fixture(autouse=True)
def torch_reference_path(monkeypatch):
    """In-process tests run the kernels' PyTorch references: kernel test modules set TRITON_INTERPRET=1 for the whole
    session, and interpreting k-means and the attention kernel on every pipeline call takes minutes. The
    interpreter path is checked against this one in a subprocess (test_triton_interpreter_path_matches_torch_path)."""
    monkeypatch.setattr(svg2, "use_triton_kernels", lambda x: False)


def latents(pipe, kind, steps=3, batch=2, cfg=True):
    call = {**tiny_call_kwargs(kind, steps=steps, batch_size=batch, cfg=cfg), **SIZE, "output_type": "latent"}
    return pipe(**call).frames


def svg2_preset(**kw):
    return vidaccel.Preset(attention=vidaccel.SVG2Attention(**{**CLUSTERS, **kw}), name="svg2-test")


def sparse_calls(stats):
    return sum(c.get("sparse", 0) for c in stats["attention_calls"].values())


@pytest.mark.parametrize("kind", KINDS)
def test_top_p_one_equals_dense_batch_two_cfg(kind, tiny_pipelines):
    """Selecting every cluster must give dense attention (permuted sums only): joint text included."""
    pipe = tiny_pipelines[kind]
    dense = latents(pipe, kind, steps=1)
    with vidaccel.apply(pipe, svg2_preset(top_p=1.0, dense_warmup=0, dense_layers=0)) as handle:
        out = latents(pipe, kind, steps=1)
        stats = handle.stats()["attention"]
    assert sparse_calls(stats) > 0 and stats["density"] == pytest.approx(1.0)
    assert out.shape[0] == 2
    torch.testing.assert_close(out, dense, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_steps_warm_start_and_remove_restores(kind, tiny_pipelines):
    pipe = tiny_pipelines[kind]
    dense = latents(pipe, kind, steps=2, batch=1)
    with vidaccel.apply(pipe, svg2_preset(top_p=0.5, dense_warmup=0, dense_layers=1)) as handle:
        sparse = latents(pipe, kind, steps=2, batch=1)
        stats = handle.stats()["attention"]
    layers = sum(len(handle.adapter.self_attention_modules(t)) for t in handle.adapter.transformers().values())
    # steps 0 and 1 are sparse, every layer but the first (of each transformer)
    per_step = CALLS_PER_STEP.get(kind, 2)
    transformers = len(handle.adapter.transformers())
    if transformers == 1:
        assert sparse_calls(stats) == 2 * per_step * (layers - 1)
        # step 0: cold k-means per (layer, branch); step 1: warm-started from step 0
        assert stats["kmeans_cold_starts"] == stats["kmeans_warm_starts"] == per_step * (layers - 1)
    else:  # Wan 2.2: the two experts split the steps; every (expert, layer, branch) starts cold once
        assert sparse_calls(stats) > 0 and stats["kmeans_cold_starts"] > 0
    # cold starts run at most first_iterations (4) each for q and k, warm ones exactly warm_iterations (2)
    warm_part = 2 * 2 * stats["kmeans_warm_starts"]
    assert warm_part < stats["kmeans_iterations"] <= warm_part + 2 * 4 * stats["kmeans_cold_starts"]
    assert 0 < stats["density"] < 1
    assert all(0 < d < 1 for d in stats["density_per_layer"].values())
    assert not any(name.endswith(".0") for name in stats["density_per_layer"])  # layer 0 stays dense
    assert torch.isfinite(sparse).all()
    assert not torch.allclose(sparse, dense, atol=1e-4)
    torch.testing.assert_close(latents(pipe, kind, steps=2, batch=1), dense, atol=0, rtol=0)  # removed: stock


def test_state_per_branch_and_reset_at_new_generation(tiny_pipelines):
    pipe = tiny_pipelines["wan"]
    with vidaccel.apply(pipe, svg2_preset(top_p=0.7, dense_warmup=0, dense_layers=0)) as handle:
        method = next(m for m in handle.methods if isinstance(m, svg2.SVG2AttentionMethod))
        latents(pipe, "wan", steps=2)
        branches = {key[2] for key in method._centroids}
        assert branches == {"cond", "uncond"}
        first = dict(method._centroids)
        assert all(c.query.shape[0] == 2 for c in first.values())  # centroids per batch item
        cold = method.cold_starts
        latents(pipe, "wan", steps=2)  # a new generation: cold k-means again, not the last video's centroids
        assert method.cold_starts == 2 * cold
        assert method.warm_starts == cold * 2  # step 1 of each generation


def test_family_defaults_and_clamping(tiny_pipelines):
    pipe = tiny_pipelines["hunyuan"]
    with vidaccel.apply(pipe, vidaccel.Preset(attention=vidaccel.SVG2Attention(dense_warmup=0, dense_layers=0,
                                                                              first_iterations=2))) as handle:
        latents(pipe, "hunyuan", steps=1, batch=1, cfg=False)  # 5 x 8 x 8 = 320 < 400 clusters: clamped
        stats = handle.stats()["attention"]
    assert stats["clusters"] == {"query": 400, "key": 1000}
    assert sparse_calls(stats) > 0 and 0 < stats["density"] <= 1
    method = vidaccel.SVG2Attention(query_clusters=5).build()
    assert (method.query_clusters, method.key_clusters) == (5, 1000)


def direct_call(layout, batch=2, heads=2, dim=32, mask=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, layout.total_tokens, heads, dim, generator=g) for _ in range(3))
    context = StepContext(step_index=5, num_steps=10, layout=layout, batch_size=batch, calls=1)
    return q, k, v, AttentionCall(3, "transformer", context, mask)


@pytest.mark.parametrize("position,padded", [("none", False), ("before", False), ("after", False), ("after", True)])
def test_joint_text_at_top_p_one_equals_dense(position, padded):
    text = 0 if position == "none" else 7
    layout = TokenLayout(3, 5, 6, text, position)
    mask = None
    if padded:  # HunyuanVideo's key-padding mask: item 0 has 4 valid text tokens, item 1 all 7
        mask = torch.ones(2, 1, 1, layout.total_tokens, dtype=torch.bool)
        mask[0, ..., layout.video_tokens + 4:] = False
    q, k, v, call = direct_call(layout, mask=mask)
    method = vidaccel.SVG2Attention(top_p=1.0, dense_warmup=0, dense_layers=0, **CLUSTERS).build()
    torch.testing.assert_close(method.attend(q, k, v, call), sdpa_bshd(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_sparse_product_is_masked_attention_in_original_order():
    """At top_p < 1 the output must be dense attention under the selected cluster mask, un-permuted, and the
    returned lse the masked log-sum-exp of each original token."""
    layout = TokenLayout(3, 5, 6)
    q, k, v, _ = direct_call(layout, seed=1)
    method = vidaccel.SVG2Attention(top_p=0.6, **CLUSTERS).build()
    step = method.sparse_step(q, k, v, need_lse=True)
    assert not step.selected.all()
    # token mask in permuted order, then back to original order through the same k-means labels
    N = layout.video_tokens
    state = next(iter(method._centroids.values()))
    assert state.query.shape == (2, 2, 8, 32) and state.key.shape == (2, 2, 16, 32)
    from vidaccel.kernels.cluster_permute import cluster_permutation
    from vidaccel.kernels.kmeans import kmeans_assign_reference

    q_labels = kmeans_assign_reference(q.transpose(1, 2), state.query)  # the last assignment's clusters
    k_labels = kmeans_assign_reference(k.transpose(1, 2), state.key)
    q_perm, k_perm = cluster_permutation(q_labels, 8), cluster_permutation(k_labels, 16)
    mask_perm = varblock_token_mask(q_perm.offsets, k_perm.offsets, step.selected, N, N)
    inv_q, inv_k = q_perm.order.argsort(-1), k_perm.order.argsort(-1)
    mask = torch.gather(mask_perm, 2, inv_q.unsqueeze(-1).expand(-1, -1, -1, N))
    mask = torch.gather(mask, 3, inv_k.unsqueeze(2).expand(-1, -1, N, -1))
    scores = torch.matmul(q.transpose(1, 2), k.transpose(1, 2).transpose(-1, -2)) / 32 ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    expected = torch.matmul(torch.softmax(scores, -1), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(step.out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)


def test_injected_attention_kernel_sees_the_permuted_tokens():
    """`attention_kernel` replaces only the sparse product (benchmarks time the rest with a stand-in): it gets the
    permuted q, k, v, offsets and selection, and its output is un-permuted like the kernel's."""
    layout = TokenLayout(3, 5, 6)
    q, k, v, _ = direct_call(layout, seed=1)
    config = vidaccel.SVG2Attention(top_p=0.6, **CLUSTERS)
    seen = []

    def reference(qp, kp, vp, q_offsets, k_offsets, selected, return_lse=False):
        from vidaccel.kernels.varblock_attention import varblock_sparse_attention_reference

        seen.append((qp.shape, q_offsets.shape, k_offsets.shape, selected.shape))
        return varblock_sparse_attention_reference(qp, kp, vp, q_offsets, k_offsets, selected,
                                                   return_lse=return_lse)

    injected = config.build().sparse_step(q, k, v, need_lse=True, attention_kernel=reference)
    default = config.build().sparse_step(q, k, v, need_lse=True)
    N = layout.video_tokens
    assert seen == [((2, 2, N, 32), (2, 2, 9), (2, 2, 17), (2, 2, 8, 16))]
    torch.testing.assert_close(injected.out, default.out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(injected.lse, default.lse, atol=1e-6, rtol=1e-6)
    # a stand-in that returns the permuted queries gives back the original queries
    stand_in = config.build().sparse_step(q, k, v, attention_kernel=lambda qp, *rest, **kw: qp)
    assert torch.equal(stand_in.out, q)


def test_batch_items_do_not_interact():
    layout = TokenLayout(2, 4, 6)
    q, k, v, _ = direct_call(layout, seed=2)
    config = vidaccel.SVG2Attention(top_p=0.7, **CLUSTERS)
    both = config.build().sparse_step(q, k, v)
    first = config.build().sparse_step(q[:1], k[:1], v[:1])
    # item 0's random initial centroids are the same draws with or without item 1 (same seed, same order)
    torch.testing.assert_close(both.out[:1], first.out, atol=1e-6, rtol=1e-6)
    assert torch.equal(both.selected[:1], first.selected)


def test_warm_start_uses_previous_centroids_and_new_shape_starts_cold():
    layout = TokenLayout(2, 4, 6)
    q, k, v, call = direct_call(layout, seed=3)
    method = vidaccel.SVG2Attention(top_p=0.8, dense_warmup=0, dense_layers=0, **CLUSTERS).build()
    first = method.sparse_step(q, k, v, ("t", 1, "cond"))
    second = method.sparse_step(q, k, v, ("t", 1, "cond"))
    other_branch = method.sparse_step(q, k, v, ("t", 1, "uncond"))
    assert (first.warm, second.warm, other_branch.warm) == (False, True, False)
    assert first.query_iterations <= 4 and first.key_iterations <= 4
    assert (second.query_iterations, second.key_iterations) == (2, 2)
    smaller = method.sparse_step(q[:, :40], k[:, :40], v[:, :40], ("t", 1, "cond"))
    assert not smaller.warm  # another shape: the stored centroids do not fit


def test_unsupported_head_dim_falls_back_to_dense_once():
    layout = TokenLayout(2, 4, 4)
    q, k, v, call = direct_call(layout, dim=24)
    method = vidaccel.SVG2Attention(dense_warmup=0, dense_layers=0, **CLUSTERS).build()
    with pytest.warns(UserWarning, match="head_dim=24"):
        out = method.attend(q, k, v, call)
    torch.testing.assert_close(out, sdpa_bshd(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.attend(q, k, v, call)
    assert method.calls[("default", "unsupported_shape")] == 2


def test_config_validation_and_preset():
    for kwargs, match in [({"top_p": 0}, "top_p"), ({"top_p": 1.2}, "top_p"), ({"query_clusters": 0}, "query"),
                          ({"key_clusters": 2.5}, "key_clusters"), ({"first_iterations": 0}, "first_iterations"),
                          ({"warm_iterations": -1}, "warm_iterations"), ({"dense_warmup": -1}, "dense_warmup"),
                          ({"dense_layers": -1}, "dense_layers"), ({"min_kept_fraction": 1.5}, "min_kept"),
                          ({"seed": -3}, "seed")]:
        with pytest.raises(ValueError, match=match):
            vidaccel.SVG2Attention(**kwargs)
    assert "svg2" in vidaccel.list_presets()
    preset = vidaccel.presets.resolve_preset("svg2")
    assert isinstance(preset.attention, vidaccel.SVG2Attention) and preset.attention.top_p == 0.9
    assert vidaccel.SVG2Attention(dense_warmup=0.2).dense_steps(50) == 10
    from vidaccel.preset_files import preset_from_dict, preset_to_dict

    again = preset_from_dict(preset_to_dict(vidaccel.Preset(attention=vidaccel.SVG2Attention(top_p=0.8))))
    assert again.attention == vidaccel.SVG2Attention(top_p=0.8)


_INTERPRETER_SCRIPT = r"""
import torch
from vidaccel.attention.svg2 import use_triton_kernels
import vidaccel
torch.manual_seed(0)
q, k, v = (torch.randn(2, 48, 2, 32) for _ in range(3))
config = vidaccel.SVG2Attention(top_p=0.7, query_clusters=4, key_clusters=6, first_iterations=2)
assert use_triton_kernels(q)
fast = config.build().sparse_step(q, k, v, need_lse=True)
from vidaccel.kernels import varblock_attention
varblock_attention.DEFAULT_KEY_MODE = "indexed"  # the kernel gathers through the orders: no permuted copies
fused = config.build().sparse_step(q, k, v, need_lse=True)
assert fused.out.shape == q.shape and fused.out.is_contiguous()
import vidaccel.attention.svg2 as svg2
svg2.use_triton_kernels = lambda x: False
ref = config.build().sparse_step(q, k, v, need_lse=True)
assert torch.equal(fast.selected, ref.selected), "selection differs"
torch.testing.assert_close(fast.out, ref.out, atol=1e-4, rtol=1e-4)
torch.testing.assert_close(fast.lse, ref.lse, atol=1e-4, rtol=1e-4)
assert torch.equal(fused.selected, ref.selected), "selection differs (indexed)"
torch.testing.assert_close(fused.out, ref.out, atol=1e-4, rtol=1e-4)
torch.testing.assert_close(fused.lse, ref.lse, atol=1e-4, rtol=1e-4)
print("ok", float(fast.selected.float().mean()))
"""


def test_triton_interpreter_path_matches_torch_path():
    """The kernel path (Triton under the interpreter; permuted copies, and the "indexed" key mode that gathers
    through the cluster orders instead) and the CPU reference path give the same product."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
