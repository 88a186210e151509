"""Radial Attention as a vidaccel method on the tiny pipelines."""


import pytest
import torch

import vidaccel
from vidaccel.attention import radial_method
from vidaccel.attention.processors import AttentionCall, sdpa_bshd
from vidaccel.attention.sparse_base import SparseAttentionMethod, run_block_sparse
from vidaccel.context import StepContext
from vidaccel.kernels._block_layout import BlockLayout
from vidaccel.layout import TokenLayout
from vidaccel.testing import tiny_call_kwargs

# big enough for several 64-token blocks: latent 5 x 16 x 16 -> 5 x 8 x 8 = 320 video tokens
SIZE = dict(height=128, width=128, num_frames=17)


def latents(pipe, kind, steps=4, batch=1, cfg=True):
    call = {**tiny_call_kwargs(kind, steps=steps, batch_size=batch, cfg=cfg), **SIZE, "output_type": "latent"}
    return pipe(**call).frames


def radial(**kw):
    return vidaccel.Preset(attention=vidaccel.RadialAttention(block_size=64, **kw), name="radial-test")


@pytest.mark.parametrize("kind", ["wan", "hunyuan", "cogvideox"])
def test_radial_runs_sparse_only_after_warmup_and_remove_restores(kind, tiny_pipelines):
    pipe = tiny_pipelines[kind]
    dense = latents(pipe, kind)
    with vidaccel.apply(pipe, radial(dense_warmup=4, dense_layers=0)):
        all_dense_steps = latents(pipe, kind)
    torch.testing.assert_close(all_dense_steps, dense, atol=1e-5, rtol=1e-5)

    with vidaccel.apply(pipe, radial(dense_warmup=2, dense_layers=1)) as handle:
        sparse = latents(pipe, kind)
        stats = handle.stats()["attention"]
    layers = len(handle.adapter.self_attention_modules(pipe.transformer))
    calls = stats["attention_calls"]
    sparse_calls = sum(c.get("sparse", 0) for c in calls.values())
    transformer_calls_per_step = {"cogvideox": 1}.get(kind, 2)
    assert sparse_calls == 2 * transformer_calls_per_step * (layers - 1)  # steps 2, 3; every layer but the first
    assert stats["layout_builds"] == 1 and 0 < stats["density"] < 1
    assert torch.isfinite(sparse).all()
    assert not torch.allclose(sparse, dense, atol=1e-4)  # sparse steps change the result
    torch.testing.assert_close(latents(pipe, kind), dense, atol=0, rtol=0)  # removed: exact stock again


@pytest.mark.parametrize("kind", ["wan", "hunyuan", "cogvideox"])
def test_radial_batch_two_with_cfg(kind, tiny_pipelines):
    pipe = tiny_pipelines[kind]
    with vidaccel.apply(pipe, radial(dense_warmup=0, dense_layers=0)) as handle:
        out = latents(pipe, kind, steps=2, batch=2)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert sum(c.get("sparse", 0) for c in handle.stats()["attention"]["attention_calls"].values()) > 0


class FullLayoutMethod(SparseAttentionMethod):
    """Every block visited: the sparse path must then equal dense attention, text handling included."""

    def sparse_video_attention(self, q, k, v, video_layout, call, need_lse):
        layout = BlockLayout.dense(q.shape[1], k.shape[1], 64)
        result = run_block_sparse(q, k, v, layout, (), return_lse=need_lse)
        return result if need_lse else (result, None)


@pytest.mark.parametrize("position,padded", [("none", False), ("before", False), ("after", False), ("after", True)])
def test_joint_text_path_equals_dense_at_full_density(position, padded):
    torch.manual_seed(0)
    text = 0 if position == "none" else 7
    layout = TokenLayout(3, 5, 6, text, position)
    batch, heads, dim = 2, 2, 32
    q, k, v = (torch.randn(batch, layout.total_tokens, heads, dim) for _ in range(3))
    mask = None
    if padded:  # HunyuanVideo's key-padding mask: item 0 has 4 valid text tokens, item 1 all 7
        mask = torch.ones(batch, 1, 1, layout.total_tokens, dtype=torch.bool)
        mask[0, ..., layout.video_tokens + 4:] = False
    context = StepContext(step_index=5, num_steps=10, layout=layout, batch_size=batch, calls=1)
    method = FullLayoutMethod(dense_warmup=0, dense_layers=0)
    out = method.attend(q, k, v, AttentionCall(3, "transformer", context, mask))
    expected = sdpa_bshd(q, k, v, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert method.calls[("default", "sparse")] == 1


def test_unsupported_shape_falls_back_to_dense_with_one_warning(monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("head_dim 24 is not supported")

    monkeypatch.setattr(radial_method, "run_block_sparse", refuse)
    method = vidaccel.RadialAttention(block_size=64, dense_warmup=0, dense_layers=0).build()
    method.decay, method.attention_sink = 0.2, True
    layout = TokenLayout(3, 4, 4)
    q, k, v = (torch.randn(1, layout.total_tokens, 2, 24) for _ in range(3))
    context = StepContext(step_index=1, num_steps=4, layout=layout, batch_size=1)
    call = AttentionCall(2, "transformer", context)
    with pytest.warns(UserWarning, match="head_dim 24"):
        out = method.attend(q, k, v, call)
    torch.testing.assert_close(out, sdpa_bshd(q, k, v))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.attend(q, k, v, call)  # second time: no warning
    assert method.calls[("default", "unsupported_shape")] == 2


def test_config_validation_and_preset():
    with pytest.raises(ValueError, match="decay"):
        vidaccel.RadialAttention(decay=0)
    with pytest.raises(ValueError, match="block_size"):
        vidaccel.RadialAttention(block_size=96)
    assert "radial" in vidaccel.list_presets()
