"""The PyTorch gather path of block-sparse attention against the kernel's reference semantics."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidaccel.attention.block_sparse_torch import block_sparse_attention_gather
from vidaccel.kernels._block_layout import BlockLayout
from vidaccel.kernels.block_sparse_attention import block_sparse_attention_reference


@settings(max_examples=25, deadline=None)
@given(
    seq=st.integers(1, 150), heads=st.integers(1, 3), batch=st.integers(1, 2), head_dim=st.sampled_from([16, 32]),
    block=st.sampled_from([16, 32]), density=st.floats(0.0, 1.0), group_mode=st.sampled_from(["one", "heads", "all"]),
    ranges=st.lists(st.tuples(st.integers(0, 150), st.integers(0, 40)), max_size=2),
    layout_name=st.sampled_from(["bhsd", "bshd"]), seed=st.integers(0, 1000),
)
def test_gather_matches_reference(seq, heads, batch, head_dim, block, density, group_mode, ranges, layout_name, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, seq, head_dim) if layout_name == "bhsd" else (batch, seq, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    groups = {"one": 1, "heads": heads, "all": batch * heads}[group_mode]
    nb = -(-seq // block)
    mask = torch.rand(groups, nb, nb, generator=gen) < density
    layout = BlockLayout.from_block_mask(mask, block, q_len=seq, kv_len=seq)
    spans = [(min(s, seq), min(s + n, seq)) for s, n in ranges]
    out, lse = block_sparse_attention_gather(q, k, v, layout, tensor_layout=layout_name, dense_kv_ranges=spans,
                                             return_lse=True)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, layout, tensor_layout=layout_name,
                                                    dense_kv_ranges=spans, return_lse=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
