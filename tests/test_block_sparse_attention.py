"""Block-sparse attention kernel against its PyTorch reference (Triton interpreter on CPU)."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first Triton import: triton.jit reads it at decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vidaccel.kernels import block_sparse_attention as bsa  # noqa: E402
from vidaccel.kernels._block_layout import BlockLayout, normalize_kv_ranges  # noqa: E402
from vidaccel.kernels.block_sparse_attention import (  # noqa: E402
    KernelConfig,
    _forward,
    block_sparse_attention,
    block_sparse_attention_reference,
    merge_attention_partials,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3}


def _qkv(batch, heads, q_len, kv_len, dim, dtype, tensor_layout, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = lambda n: (batch, heads, n, dim) if tensor_layout == "bhsd" else (batch, n, heads, dim)  # noqa: E731
    return [torch.randn(shape(n), generator=gen).to(DEVICE, dtype) for n in (q_len, kv_len, kv_len)]


def _random_layout(groups, q_len, kv_len, block_m, block_n, density, seed, empty_rows=True):
    gen = torch.Generator().manual_seed(seed)
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    mask = torch.rand(groups, nq, nk, generator=gen) < density
    if empty_rows and nq > 1:
        mask[:, 0] = False  # a query block that visits nothing in the layout
    return BlockLayout.from_block_mask(mask.to(DEVICE), block_m, block_n, q_len=q_len, kv_len=kv_len)


def _check(out, ref, lse=None, ref_lse=None, dtype=torch.float32):
    assert not torch.isnan(out).any()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    if lse is not None:
        assert lse.dtype == torch.float32 and not torch.isnan(lse).any()
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-4, rtol=1e-4)


@settings(max_examples=14, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 2), heads=st.integers(1, 3), q_len=st.integers(1, 90), kv_len=st.integers(1, 90),
    dim=st.sampled_from([64, 128]), dtype=st.sampled_from([torch.float32, torch.float16]),
    tensor_layout=st.sampled_from(["bhsd", "bshd"]), group_mode=st.sampled_from(["one", "heads", "all"]),
    blocks=st.sampled_from([(32, 32), (64, 32), (32, 64)]), density=st.floats(0.0, 1.0),
    raw_ranges=st.lists(st.tuples(st.integers(0, 90), st.integers(0, 30)), max_size=2), seed=st.integers(0, 99),
)
def test_matches_reference(batch, heads, q_len, kv_len, dim, dtype, tensor_layout, group_mode, blocks, density,
                           raw_ranges, seed):
    groups = {"one": 1, "heads": heads, "all": batch * heads}[group_mode]
    layout = _random_layout(groups, q_len, kv_len, *blocks, density, seed)
    ranges = [(min(s, kv_len), min(s + n, kv_len)) for s, n in raw_ranges]
    q, k, v = _qkv(batch, heads, q_len, kv_len, dim, dtype, tensor_layout, seed)
    out, lse = block_sparse_attention(q, k, v, layout, tensor_layout=tensor_layout, dense_kv_ranges=ranges,
                                      return_lse=True)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, layout, tensor_layout=tensor_layout,
                                                    dense_kv_ranges=ranges, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    _check(out, ref, lse, ref_lse, dtype)


@pytest.mark.parametrize("config", [KernelConfig(32, 16, 4, 1, False), KernelConfig(64, 32, 4, 1, True),
                                    KernelConfig(32, 16, 4, 1, False, prefetch_index=True)],
                         ids=["subtiles", "tensor-descriptors", "index-prefetch"])
def test_kernel_variants_agree(config):
    """Query/key tiles smaller than the layout blocks, the tensor-descriptor (TMA) path, and the clean loop that
    reads the next block index one tile ahead (sub-tiles, so consecutive tiles share and then change blocks)."""
    if config.use_tma and DEVICE == "cpu" and not bsa._INTERPRETED:
        pytest.skip("needs the interpreter or a Hopper GPU")
    layout = _random_layout(2, 150, 130, 64, 64, 0.6, seed=3)
    q, k, v = _qkv(1, 2, 150, 130, 64, torch.float16, "bshd", seed=3)
    ranges = [(10, 40), (120, 130)]
    out, lse = _forward(q, k, v, layout, "bshd", ranges, None, True, config=config)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, layout, tensor_layout="bshd", dense_kv_ranges=ranges,
                                                    return_lse=True)
    _check(out, ref, lse, ref_lse, torch.float16)


def test_empty_rows_give_zero_and_neg_inf_lse():
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, 1, 2] = True  # only query block 1 visits anything (the ragged last key block)
    layout = BlockLayout.from_block_mask(mask.to(DEVICE), 32, 32, q_len=70, kv_len=70)
    q, k, v = _qkv(1, 2, 70, 70, 64, torch.float16, "bhsd", seed=0)
    out, lse = block_sparse_attention(q, k, v, layout, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[:, :, :32], torch.zeros_like(out[:, :, :32]))
    assert torch.equal(out[:, :, 64:], torch.zeros_like(out[:, :, 64:]))
    assert torch.isneginf(lse[:, :, :32]).all() and torch.isneginf(lse[:, :, 64:]).all()
    assert torch.isfinite(lse[:, :, 32:64]).all()
    ref = block_sparse_attention_reference(q, k, v, layout)
    _check(out, ref, dtype=torch.float16)


def test_range_keys_inside_layout_blocks_count_once():
    """A range that overlaps visited blocks adds nothing: the result equals the layout alone."""
    layout = BlockLayout.dense(96, 96, 32, device=DEVICE)
    q, k, v = _qkv(1, 1, 96, 96, 64, torch.float32, "bhsd", seed=1)
    plain = block_sparse_attention(q, k, v, layout)
    with_ranges = block_sparse_attention(q, k, v, layout, dense_kv_ranges=[(0, 40), (30, 50), (90, 96)])
    _check(with_ranges, plain)
    # And a range alone (empty layout) equals attention restricted to those keys.
    empty = BlockLayout.from_block_mask(torch.zeros(1, 3, 3, dtype=torch.bool, device=DEVICE), 32, 32,
                                        q_len=96, kv_len=96)
    only = block_sparse_attention(q, k, v, empty, dense_kv_ranges=[(5, 45)])
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.double(), k[:, :, 5:45].double(), v[:, :, 5:45].double())
    _check(only, sdpa.float())


def test_merge_partials_equals_union():
    q_len, kv_len = 70, 90
    gen = torch.Generator().manual_seed(7)
    nq, nk = 3, 3
    union = torch.rand(1, nq, nk, generator=gen) < 0.7
    union[0, 0] = False  # a row empty on both sides
    first = union & (torch.rand(1, nq, nk, generator=gen) < 0.5)
    first[0, 1] = False  # a row empty on one side only
    second = union & ~first
    layouts = [BlockLayout.from_block_mask(m.to(DEVICE), 32, 32, q_len=q_len, kv_len=kv_len)
               for m in (first, second, union)]
    q, k, v = _qkv(2, 2, q_len, kv_len, 64, torch.float32, "bshd", seed=7)
    (o1, l1), (o2, l2), (ou, lu) = (block_sparse_attention(q, k, v, lay, tensor_layout="bshd", return_lse=True)
                                    for lay in layouts)
    merged, merged_lse = merge_attention_partials(o1, l1, o2, l2, tensor_layout="bshd")
    _check(merged, ou, merged_lse, lu)


def test_reads_strided_views_without_copies():
    """diffusers-style (batch, tokens, heads, dim) views of a (batch, heads, tokens, dim) buffer."""
    base = _qkv(1, 3, 100, 100, 64, torch.float16, "bhsd", seed=5)
    q, k, v = (t.transpose(1, 2) for t in base)
    assert not q.is_contiguous()
    layout = _random_layout(3, 100, 100, 32, 32, 0.5, seed=5)
    out = block_sparse_attention(q, k, v, layout, tensor_layout="bshd")
    ref = block_sparse_attention_reference(q, k, v, layout, tensor_layout="bshd")
    assert out.shape == q.shape
    _check(out, ref, dtype=torch.float16)


def test_rejects_unsupported_inputs():
    layout = BlockLayout.dense(64, 64, 32, device=DEVICE)
    q, k, v = _qkv(1, 2, 64, 64, 48, torch.float16, "bhsd", seed=0)
    with pytest.raises(ValueError, match="head_dim=48"):
        block_sparse_attention(q, k, v, layout)
    q, k, v = _qkv(1, 2, 64, 64, 64, torch.float16, "bhsd", seed=0)
    with pytest.raises(ValueError, match="q_len=64"):
        block_sparse_attention(q, k, v, BlockLayout.dense(96, 64, 32, device=DEVICE))
    with pytest.raises(ValueError, match="groups"):
        block_sparse_attention(q, k, v, _random_layout(3, 64, 64, 32, 32, 0.5, seed=0))
    with pytest.raises(ValueError, match="dense_kv_ranges"):
        block_sparse_attention(q, k, v, layout, dense_kv_ranges=[(10, 80)])


def test_layout_density_and_masks():
    mask = torch.tensor([[[True, False, True], [False, False, True]]])
    layout = BlockLayout.from_block_mask(mask, 32, 32, q_len=40, kv_len=70)  # ragged: 8 query rows, 6 key cols
    assert torch.equal(layout.block_mask().cpu(), mask)
    assert layout.kv_block_counts.tolist() == [[2, 1]]
    dense = layout.to_dense_mask()
    assert dense.shape == (1, 40, 70)
    expected = (32 * (32 + 6) + 8 * 6) / (40 * 70)
    assert layout.density == pytest.approx(expected)
    assert layout.density == pytest.approx(dense.double().mean().item())
    ranges = [(0, 10), (60, 70)]
    covered = dense.clone()
    for s, e in ranges:
        covered[:, :, s:e] = True
    assert layout.effective_density(ranges) == pytest.approx(covered.double().mean().item())
    assert BlockLayout.dense(40, 70, 32).density == pytest.approx(1.0)


def test_normalize_kv_ranges_merges_and_validates():
    assert normalize_kv_ranges([(5, 9), (0, 3), (3, 4), (8, 12), (7, 7)], 20) == ((0, 4), (5, 12))
    with pytest.raises(ValueError):
        normalize_kv_ranges([(3, 2)], 10)
    with pytest.raises(ValueError):
        normalize_kv_ranges([(0, 11)], 10)


def test_radial_plan_runs_through_the_kernel():
    """A Radial plan (ragged blocks, sink frame and text as dense ranges) gives masked softmax over exactly
    the layout blocks plus the range keys."""
    from vidaccel.attention.radial import TokenLayout, radial_block_layout

    token_layout = TokenLayout(4, 3, 7, 6, "after")  # 90 tokens: ragged with 32-token blocks
    plan = radial_block_layout(token_layout, block_size=32, decay=0.5, device=DEVICE)
    n = token_layout.total_tokens
    q, k, v = _qkv(1, 2, n, n, 64, torch.float16, "bshd", seed=11)
    out = block_sparse_attention(q, k, v, plan.layout, tensor_layout="bshd", dense_kv_ranges=plan.dense_kv_ranges)
    allowed = plan.layout.to_dense_mask()[0].clone()
    for start, end in plan.dense_kv_ranges:
        allowed[:, start:end] = True
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2).double() for t in (q, k, v)), attn_mask=allowed).transpose(1, 2)
    _check(out, ref.float(), dtype=torch.float16)
    assert plan.density == pytest.approx(allowed.double().mean().item())


def test_autotune_keeps_the_two_cta_tiles_for_hopper_head_dim_128():
    """On TMA-eligible inputs with head_dim 128 the autotuner only times the 64-key-column TMA tiles (the ones that
    win on sparse layouts); other head dims and non-TMA inputs keep every tile that divides the layout blocks."""
    configs = [c.as_triton() for c in bsa._TUNING_CANDIDATES + bsa._SMALL_TILE_CANDIDATES]
    hopper_128 = bsa._prune_configs(configs, {"LAYOUT_BM": 128, "LAYOUT_BN": 128, "TMA_OK": True, "HEAD_DIM": 128})
    assert hopper_128 and all(c.kwargs["USE_TMA"] and c.kwargs["BLOCK_N"] == 64 for c in hopper_128)
    assert hopper_128[0].kwargs["PREFETCH_INDEX"] and hopper_128[0].kwargs["BLOCK_M"] == 128
    no_tma = bsa._prune_configs(configs, {"LAYOUT_BM": 128, "LAYOUT_BN": 128, "TMA_OK": False, "HEAD_DIM": 128})
    assert no_tma and not any(c.kwargs["USE_TMA"] for c in no_tma)
    hopper_64 = bsa._prune_configs(configs, {"LAYOUT_BM": 128, "LAYOUT_BN": 128, "TMA_OK": True, "HEAD_DIM": 64})
    assert len(hopper_64) > len(hopper_128)
    small_blocks = bsa._prune_configs(configs, {"LAYOUT_BM": 32, "LAYOUT_BN": 32, "TMA_OK": True, "HEAD_DIM": 128})
    assert small_blocks and all(c.kwargs["BLOCK_M"] <= 32 and c.kwargs["BLOCK_N"] <= 32 for c in small_blocks)
