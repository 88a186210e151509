"""Variable-block (SVG2) sparse attention kernel against its PyTorch reference (Triton interpreter on CPU)."""

import functools
import os

import torch

if not torch.cuda.is_available():  # must precede the first Triton import: triton.jit reads it at decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vidaccel.kernels.block_sparse_attention import merge_attention_partials  # noqa: E402
from vidaccel.kernels.varblock_attention import (  # noqa: E402
    _forward,
    build_varblock_plan,
    max_query_tiles,
    varblock_density,
    varblock_sparse_attention,
    varblock_sparse_attention_reference,
    varblock_token_mask,
    write_key_tokens,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3}


def _offsets_from_sizes(sizes):
    """(B, H, C) sizes -> (B, H, C + 1) int32 cumulative offsets."""
    sizes = torch.as_tensor(sizes, dtype=torch.int64)
    zero = torch.zeros(*sizes.shape[:-1], 1, dtype=torch.int64)
    return torch.cat([zero, sizes.cumsum(-1)], -1).to(torch.int32).to(DEVICE)


def _random_offsets(batch, heads, n, clusters, gen):
    """Ragged clusters: sorted random cut points give empty, size-1 and large clusters."""
    cuts = torch.sort(torch.randint(0, n + 1, (batch, heads, clusters - 1), generator=gen), dim=-1).values
    full = torch.cat([torch.zeros(batch, heads, 1, dtype=torch.int64), cuts,
                      torch.full((batch, heads, 1), n, dtype=torch.int64)], -1)
    return full.to(torch.int32).to(DEVICE)


def _qkv(batch, heads, q_len, kv_len, dim, dtype, gen):
    return [torch.randn(batch, heads, n, dim, generator=gen).to(DEVICE, dtype) for n in (q_len, kv_len, kv_len)]


def _check(out, ref, lse=None, ref_lse=None, dtype=torch.float32):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == out.shape[:3] and not torch.isnan(lse).any()
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-4, rtol=1e-4)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 2), heads=st.integers(1, 2), q_len=st.integers(1, 70), kv_len=st.integers(1, 70),
    q_clusters=st.integers(1, 6), k_clusters=st.integers(1, 12), dim=st.sampled_from([32, 64, 128]),
    dtype=st.sampled_from([torch.float32, torch.float16]), key_mode=st.sampled_from(["packed", "ranges", "indexed"]),
    block_m=st.sampled_from([16, 32]), density=st.floats(0.0, 1.0), seed=st.integers(0, 999),
)
def test_matches_reference_on_random_ragged_layouts(batch, heads, q_len, kv_len, q_clusters, k_clusters, dim, dtype,
                                                    key_mode, block_m, density, seed):
    gen = torch.Generator().manual_seed(seed)
    q_off = _random_offsets(batch, heads, q_len, q_clusters, gen)
    k_off = _random_offsets(batch, heads, kv_len, k_clusters, gen)
    selected = (torch.rand(batch, heads, q_clusters, k_clusters, generator=gen) < density).to(DEVICE)
    q, k, v = _qkv(batch, heads, q_len, kv_len, dim, dtype, gen)
    out, lse = _forward(q, k, v, q_off, k_off, selected, None, True, key_mode=key_mode, block_m=block_m)
    ref, ref_lse = varblock_sparse_attention_reference(q, k, v, q_off, k_off, selected, return_lse=True)
    _check(out, ref, lse, ref_lse, dtype)


@pytest.mark.parametrize("key_mode", ["packed", "ranges", "indexed"])
def test_size_one_giant_and_empty_clusters(key_mode):
    """Size-1 clusters, one giant cluster, empty clusters (also selected ones) and rows selecting nothing."""
    q_sizes = [[[1, 0, 45, 1, 0, 3, 1], [50, 1, 0, 0, 0, 0, 0]]]  # 51 query tokens per head
    k_sizes = [[[1, 1, 0, 1, 30, 0, 0, 1, 1, 5, 1, 0, 1], [0, 0, 1, 40, 1, 0, 0, 0, 0, 0, 0, 0, 0]]]  # 42 keys
    q_off, k_off = _offsets_from_sizes(q_sizes), _offsets_from_sizes(k_sizes)
    gen = torch.Generator().manual_seed(4)
    selected = torch.rand(1, 2, 7, 13, generator=gen) < 0.5
    selected[0, 0, 2] = False  # the giant query cluster selects nothing...
    selected[0, 0, 3] = False
    selected[0, 0, 3, [2, 5, 6]] = True  # ...and this size-1 cluster only empty key clusters: both see no key
    selected[0, 1, 0] = True  # giant query cluster x giant key cluster, plus every empty one
    q, k, v = _qkv(1, 2, 51, 42, 64, torch.float16, gen)
    out, lse = _forward(q, k, v, q_off, k_off, selected.to(DEVICE), None, True, key_mode=key_mode, block_m=16)
    ref, ref_lse = varblock_sparse_attention_reference(q, k, v, q_off, k_off, selected.to(DEVICE), return_lse=True)
    _check(out, ref, lse, ref_lse, torch.float16)
    for rows in (slice(1, 46), slice(46, 47)):  # giant cluster 2 and cluster 3 of head 0
        assert torch.equal(out[0, 0, rows], torch.zeros_like(out[0, 0, rows]))
        assert torch.isneginf(lse[0, 0, rows]).all()


@pytest.mark.parametrize("k_clusters", [9, 16])
def test_alternating_selection_has_the_most_runs(k_clusters):
    """Every other key cluster selected: ceil(Ck / 2) runs, the most the kernel's run search must reach."""
    gen = torch.Generator().manual_seed(k_clusters)
    k_sizes = torch.randint(1, 4, (1, 1, k_clusters), generator=gen)
    kv_len = int(k_sizes.sum())
    q_off, k_off = _offsets_from_sizes([[[20, 13]]]), _offsets_from_sizes(k_sizes)
    selected = torch.zeros(1, 1, 2, k_clusters, dtype=torch.bool)
    selected[..., 0, 0::2] = True
    selected[..., 1, 1::2] = True
    selected = selected.to(DEVICE)
    plan = build_varblock_plan(q_off, k_off, selected, q_len=33, block_m=16)
    assert plan.num_runs.tolist() == [[(k_clusters + 1) // 2, k_clusters // 2]]
    q, k, v = _qkv(1, 1, 33, kv_len, 32, torch.float32, gen)
    out, lse = _forward(q, k, v, q_off, k_off, selected, None, True, key_mode="packed", block_m=16)
    ref, ref_lse = varblock_sparse_attention_reference(q, k, v, q_off, k_off, selected, return_lse=True)
    _check(out, ref, lse, ref_lse)


@pytest.mark.parametrize("key_runs", [True, False])
def test_indexed_token_list_is_each_query_clusters_selected_keys_in_order(key_runs):
    """The token list of key_mode="indexed" holds, per query cluster, exactly the key tokens its selected clusters
    own, ascending (the packed key sequence), in the first key_count entries of its row; a group of heads gets
    the rows of its own pairs. Plans with merged runs and plans of bare clusters give the same lists."""
    gen = torch.Generator().manual_seed(5)
    q_off, k_off = _random_offsets(2, 3, 40, 5, gen), _random_offsets(2, 3, 77, 13, gen)
    selected = (torch.rand(2, 3, 5, 13, generator=gen) < 0.4).to(DEVICE)
    plan = build_varblock_plan(q_off, k_off, selected, q_len=40, block_m=16, key_runs=key_runs)
    assert (plan.num_runs is None) != key_runs
    mask = varblock_token_mask(_offsets_from_sizes(torch.ones(2, 3, 5, dtype=torch.int64)), k_off, selected, 5, 77)
    wanted = [torch.nonzero(row).flatten().tolist() for row in mask.reshape(-1, 77)]
    counts = plan.key_count.reshape(-1).tolist()
    tokens = write_key_tokens(plan, 77)
    assert [tokens[row, :count].tolist() for row, count in enumerate(counts)] == wanted
    group = write_key_tokens(plan, 77, first_bh=4, num_bh=2)  # pairs 4 and 5: rows 20-29
    assert [group[row, :counts[20 + row]].tolist() for row in range(10)] == wanted[20:]
    if not key_runs:
        q, k, v = _qkv(2, 3, 40, 77, 32, torch.float32, gen)
        with pytest.raises(ValueError, match="merged key runs"):
            _forward(q, k, v, q_off, k_off, selected, key_mode="packed", block_m=16, plan=plan)
        out = _forward(q, k, v, q_off, k_off, selected, key_mode="indexed", block_m=16, plan=plan)[0]
        _check(out, varblock_sparse_attention_reference(q, k, v, q_off, k_off, selected))


def test_indexed_heads_run_in_groups_within_the_token_budget(monkeypatch):
    """A budget of two heads' lists splits 2 x 3 (batch, head) pairs into groups of 2 that reuse one buffer, and
    the result is the reference's."""
    from vidaccel.kernels import varblock_attention as vba

    gen = torch.Generator().manual_seed(8)
    q_off, k_off = _random_offsets(2, 3, 45, 4, gen), _random_offsets(2, 3, 50, 9, gen)
    selected = (torch.rand(2, 3, 4, 9, generator=gen) < 0.5).to(DEVICE)
    q, k, v = _qkv(2, 3, 45, 50, 32, torch.float32, gen)
    monkeypatch.setattr(vba, "KEY_TOKENS_BUDGET_BYTES", 2 * 4 * 50 * 4 + 3)
    assert vba.indexed_heads_per_launch(6, 4, 50) == 2
    out, lse = _forward(q, k, v, q_off, k_off, selected, None, True, key_mode="indexed", block_m=16)
    ref, ref_lse = varblock_sparse_attention_reference(q, k, v, q_off, k_off, selected, return_lse=True)
    _check(out, ref, lse, ref_lse)
    monkeypatch.setattr(vba, "KEY_TOKENS_BUDGET_BYTES", 0)
    assert vba.indexed_heads_per_launch(6, 4, 50) == 1  # at least one pair per launch, whatever the budget


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_orders_replace_the_permutations(dtype):
    """With q_order / k_order the kernel takes q, k, v in the caller's (B, N, H, D) memory, unpermuted, and returns
    out and lse in that order and layout: the reference on the permuted tokens, put back in place."""
    from vidaccel.kernels.cluster_permute import permute_tokens_reference, unpermute_tokens_reference

    gen = torch.Generator().manual_seed(17)
    B, H, Nq, Nk, D = 2, 3, 53, 61, 32
    q_off, k_off = _random_offsets(B, H, Nq, 4, gen), _random_offsets(B, H, Nk, 9, gen)
    selected = (torch.rand(B, H, 4, 9, generator=gen) < 0.5).to(DEVICE)
    q_order = torch.argsort(torch.rand(B, H, Nq, generator=gen), dim=-1).to(DEVICE)
    k_order = torch.argsort(torch.rand(B, H, Nk, generator=gen), dim=-1).to(DEVICE, torch.int32)
    q, k, v = (torch.randn(B, n, H, D, generator=gen).to(DEVICE, dtype) for n in (Nq, Nk, Nk))  # (B, N, H, D)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out, lse = varblock_sparse_attention(qt, kt, vt, q_off, k_off, selected, return_lse=True, block_m=16,
                                         q_order=q_order, k_order=k_order)
    assert out.transpose(1, 2).is_contiguous()  # the caller's (B, N, H, D) layout, no copy needed
    ref_p, ref_lse_p = varblock_sparse_attention_reference(
        permute_tokens_reference(q, q_order), permute_tokens_reference(k, k_order),
        permute_tokens_reference(v, k_order), q_off, k_off, selected, return_lse=True)
    ref = unpermute_tokens_reference(ref_p, q_order).transpose(1, 2)
    ref_lse = torch.empty_like(ref_lse_p).scatter_(2, q_order, ref_lse_p)
    _check(out, ref, lse, ref_lse, dtype)
    ref_o, ref_o_lse = varblock_sparse_attention_reference(qt, kt, vt, q_off, k_off, selected, return_lse=True,
                                                           q_order=q_order, k_order=k_order)
    _check(out, ref_o, lse, ref_o_lse, dtype)
    with pytest.raises(ValueError, match="both q_order and k_order"):
        varblock_sparse_attention(qt, kt, vt, q_off, k_off, selected, q_order=q_order)
    with pytest.raises(ValueError, match="key_mode='indexed'"):
        varblock_sparse_attention(qt, kt, vt, q_off, k_off, selected, q_order=q_order, k_order=k_order,
                                  key_mode="packed")
    with pytest.raises(ValueError, match="k_order must be an int32/int64"):
        varblock_sparse_attention(qt, kt, vt, q_off, k_off, selected, q_order=q_order, k_order=k_order[..., 1:])


@pytest.mark.parametrize("key_window", [1, 2, 16])
def test_packed_run_window_and_its_search_fallback_agree(key_window):
    """Packed key tiles look runs up in a window of run starts and fall back to a search when a tile crosses more
    run starts than the window holds: tiny alternating runs force the fallback for small windows, a window as
    wide as the 16-key tile never needs it."""
    from vidaccel.kernels.varblock_attention import VarBlockConfig

    gen = torch.Generator().manual_seed(31)
    k_sizes = torch.randint(1, 3, (1, 2, 40), generator=gen)
    k_sizes[0, 1] = k_sizes[0, 0]
    k_sizes[0, 1, 5], k_sizes[0, 1, 6:16] = k_sizes[0, 1, 5:16].sum(), 0  # head 1: one long cluster, empty ones
    kv_len = int(k_sizes[0, 0].sum())
    q_off, k_off = _offsets_from_sizes([[[20, 13], [7, 26]]]), _offsets_from_sizes(k_sizes)
    selected = torch.rand(1, 2, 2, 40, generator=gen) < 0.5
    selected[..., 0, 0::2] = True
    selected[..., 0, 1::2] = False
    selected = selected.to(DEVICE)
    q, k, v = _qkv(1, 2, 33, kv_len, 32, torch.float32, gen)
    out, lse = _forward(q, k, v, q_off, k_off, selected, None, True, key_mode="packed", block_m=16,
                        config=VarBlockConfig(16, 4, 1, key_window=key_window))
    ref, ref_lse = varblock_sparse_attention_reference(q, k, v, q_off, k_off, selected, return_lse=True)
    _check(out, ref, lse, ref_lse)


@pytest.mark.parametrize("key_mode", ["packed", "ranges", "indexed"])
def test_remainder_tiles_cover_short_cluster_tails(key_mode):
    """32-row tiles plus a second launch of 16-row tiles for tails of at most 16 rows."""
    gen = torch.Generator().manual_seed(12)
    q_sizes = [[[0, 5, 16, 17, 32, 40, 49, 1], [64, 0, 33, 0, 0, 63, 0, 0]]]  # tails 5 16 17 0 8 17 1 / 0 1 31
    q_off, k_off = _offsets_from_sizes(q_sizes), _random_offsets(1, 2, 57, 6, gen)
    selected = (torch.rand(1, 2, 8, 6, generator=gen) < 0.6).to(DEVICE)
    plan = build_varblock_plan(q_off, k_off, selected, q_len=160, block_m=32, remainder_block_m=16)
    assert (plan.tile_cluster[0] >= 0).sum().item() == 0 + 0 + 0 + 1 + 1 + 1 + 2 + 0  # tails 17 add a big tile
    assert (plan.remainder_tile_cluster[0] >= 0).sum().item() == 4  # tails 5, 16, 8, 1
    assert (plan.tile_cluster[1] >= 0).sum().item() == 2 + 1 + 2 and (plan.remainder_tile_cluster[1] >= 0).sum() == 1
    q, k, v = _qkv(1, 2, 160, 57, 32, torch.float32, gen)
    out, lse = _forward(q, k, v, q_off, k_off, selected, None, True, key_mode=key_mode, block_m=32,
                        remainder_block_m=16)
    ref, ref_lse = varblock_sparse_attention_reference(q, k, v, q_off, k_off, selected, return_lse=True)
    _check(out, ref, lse, ref_lse)
    with pytest.raises(ValueError, match="remainder_block_m"):
        varblock_sparse_attention(q, k, v, q_off, k_off, selected, block_m=32, remainder_block_m=32)


def test_default_entry_point_and_custom_scale():
    gen = torch.Generator().manual_seed(9)
    q_off = _random_offsets(1, 2, 40, 3, gen)
    k_off = _random_offsets(1, 2, 50, 7, gen)
    selected = (torch.rand(1, 2, 3, 7, generator=gen) < 0.6).to(DEVICE)
    q, k, v = _qkv(1, 2, 40, 50, 32, torch.float32, gen)
    out = varblock_sparse_attention(q, k, v, q_off, k_off, selected, sm_scale=0.3)
    ref = varblock_sparse_attention_reference(q, k, v, q_off, k_off, selected, sm_scale=0.3)
    _check(out, ref)


def test_reads_strided_views_without_copies():
    """(B, H, N, D) views of a diffusers-style (B, N, H, D) buffer."""
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(1, n, 2, 64, generator=gen).to(DEVICE, torch.float16) for n in (45, 38, 38)]
    q, k, v = (t.transpose(1, 2) for t in base)
    assert not q.is_contiguous()
    q_off, k_off = _random_offsets(1, 2, 45, 4, gen), _random_offsets(1, 2, 38, 6, gen)
    selected = (torch.rand(1, 2, 4, 6, generator=gen) < 0.5).to(DEVICE)
    out = varblock_sparse_attention(q, k, v, q_off, k_off, selected, block_m=32)
    _check(out, varblock_sparse_attention_reference(q, k, v, q_off, k_off, selected), dtype=torch.float16)


def test_lse_merges_with_merge_attention_partials():
    """Two disjoint selections merged through their lse equal the attention over their union."""
    gen = torch.Generator().manual_seed(7)
    q_off, k_off = _random_offsets(2, 1, 50, 4, gen), _random_offsets(2, 1, 60, 9, gen)
    union = torch.rand(2, 1, 4, 9, generator=gen) < 0.7
    union[0, 0, 0] = False  # a cluster empty on both sides
    first = union & (torch.rand(2, 1, 4, 9, generator=gen) < 0.5)
    first[1, 0, 1] = False  # a cluster empty on one side only
    second = union & ~first
    q, k, v = _qkv(2, 1, 50, 60, 32, torch.float32, gen)
    (o1, l1), (o2, l2), (ou, lu) = (varblock_sparse_attention(q, k, v, q_off, k_off, s.to(DEVICE), return_lse=True)
                                    for s in (first, second, union))
    merged, merged_lse = merge_attention_partials(o1, l1, o2, l2)
    _check(merged, ou, merged_lse, lu)
    ref, ref_lse = varblock_sparse_attention_reference(q, k, v, q_off, k_off, union.to(DEVICE), return_lse=True)
    _check(merged, ref, merged_lse, ref_lse)


def test_plan_merges_adjacent_runs_and_covers_every_query_row():
    k_sizes = [[[2, 3, 0, 4, 5, 0, 1]]]  # offsets 0 2 5 5 9 14 14 15
    q_sizes = [[[0, 33, 1, 16, 0]]]
    selected = torch.tensor([[[[1, 1, 0, 0, 1, 0, 1],   # [0,5) and [9,15): cluster 5 is empty, so 4 and 6 touch
                               [0, 1, 1, 1, 0, 0, 0],   # empty cluster 2 between selected ones: one run [2,9)
                               [0, 0, 1, 0, 0, 1, 0],   # only empty clusters: no run
                               [1, 0, 0, 1, 0, 0, 1],   # three runs
                               [1, 1, 1, 1, 1, 1, 1]]]], dtype=torch.bool, device=DEVICE)
    q_off, k_off = _offsets_from_sizes(q_sizes), _offsets_from_sizes(k_sizes)
    plan = build_varblock_plan(q_off, k_off, selected, q_len=50, block_m=16)
    assert plan.num_runs.tolist() == [[2, 1, 0, 3, 1]]
    assert plan.key_count.tolist() == [[11, 7, 0, 7, 15]]
    assert plan.range_start[0, 0, :2].tolist() == [0, 9] and plan.range_cum[0, 0, :3].tolist() == [0, 5, 11]
    assert plan.range_start[0, 3, :3].tolist() == [0, 5, 14] and plan.range_cum[0, 3, :4].tolist() == [0, 2, 6, 7]
    assert plan.range_cum[0, 2].tolist() == [0] * 8
    # Tiles: ceil(33/16) + 1 + 1 = 5 used slots of the shape-only bound, heaviest first, each row once.
    assert plan.num_tiles == max_query_tiles(50, 5, 16)
    used = plan.tile_cluster[0] >= 0
    assert int(used.sum()) == 5 and bool(used[:5].all())
    weights = plan.key_count[0][plan.tile_cluster[0][:5].long()]
    assert weights.tolist() == sorted(weights.tolist(), reverse=True)
    covered = torch.zeros(50, dtype=torch.int64)
    for c, r in zip(plan.tile_cluster[0][:5].tolist(), plan.tile_row[0][:5].tolist()):
        end = min(r + 16, int(q_off[0, 0, c + 1]))
        assert int(q_off[0, 0, c]) <= r < end
        covered[r:end] += 1
    assert covered.tolist() == [1] * 50


def test_density_matches_token_mask():
    gen = torch.Generator().manual_seed(2)
    q_off, k_off = _random_offsets(2, 3, 37, 5, gen), _random_offsets(2, 3, 41, 8, gen)
    selected = (torch.rand(2, 3, 5, 8, generator=gen) < 0.4).to(DEVICE)
    density = varblock_density(q_off, k_off, selected)
    mask = varblock_token_mask(q_off, k_off, selected, 37, 41)
    assert density.shape == (2, 3) and density.dtype == torch.float32
    torch.testing.assert_close(density, mask.float().mean((-1, -2)))


def test_rejects_bad_input():
    gen = torch.Generator().manual_seed(0)
    q, k, v = _qkv(1, 2, 20, 24, 64, torch.float16, gen)
    q_off, k_off = _offsets_from_sizes([[[10, 10]] * 2]), _offsets_from_sizes([[[8, 8, 8]] * 2])
    selected = torch.ones(1, 2, 2, 3, dtype=torch.bool, device=DEVICE)
    # Offset values are read on the host: the kernel entry checks them by default only for CPU tensors.
    checked_kernel = functools.partial(varblock_sparse_attention, check_offsets=True)
    for fn in (checked_kernel, varblock_sparse_attention_reference):
        with pytest.raises(ValueError, match="4D"):
            fn(q[0], k, v, q_off, k_off, selected)
        with pytest.raises(ValueError, match="incompatible shapes"):
            fn(q, k[..., :32], v, q_off, k_off, selected)
        q48, k48, v48 = _qkv(1, 2, 20, 24, 48, torch.float16, gen)
        with pytest.raises(ValueError, match="head_dim=48"):
            fn(q48, k48, v48, q_off, k_off, selected)
        with pytest.raises(ValueError, match="end at the token count 24"):
            fn(q, k, v, q_off, _offsets_from_sizes([[[8, 8, 7]] * 2]), selected)
        with pytest.raises(ValueError, match="nondecreasing"):
            fn(q, k, v, q_off, _offsets_from_sizes([[[12, -4, 16]] * 2]), selected)
        with pytest.raises(ValueError, match="int32"):
            fn(q, k, v, q_off.long(), k_off, selected)
        with pytest.raises(ValueError, match=r"selected must be a bool \(B, H, Cq, Ck\) = \(1, 2, 2, 3\)"):
            fn(q, k, v, q_off, k_off, selected[..., :2])
        with pytest.raises(ValueError, match="selected must be a bool"):
            fn(q, k, v, q_off, k_off, selected.int())
    with pytest.raises(ValueError, match="key_mode"):
        varblock_sparse_attention(q, k, v, q_off, k_off, selected, key_mode="dense")


# Compiled in a fresh interpreter: under TRITON_INTERPRET=1 the kernels here are not compilable objects.
_HOPPER_COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vidaccel.kernels import varblock_attention as vba

fn = vba._varblock_attn_fwd
int_tables = ("Q_OFF", "TILE_CLUSTER", "TILE_ROW", "RANGE_START", "RANGE_CUM", "KEY_COUNT", "NUM_RUNS", "KEY_TOKENS")
meta_names = ("HEAD_DIM", "BLOCK_M", "LOG_R", "KEY_MODE", "STORE_LSE", "IEEE_DOT", "GATHER_Q", "BLOCK_N",
              "KEY_WINDOW")
signature = {}
for name in fn.arg_names:
    if name in ("Q", "K", "V", "O"):
        signature[name] = "*bf16"
    elif name == "LSE":
        signature[name] = "*fp32"
    elif name == "Q_ORDER":
        signature[name] = "*i64"
    elif name in int_tables:
        signature[name] = "*i32"
    elif name == "qk_scale":
        signature[name] = "fp32"
    elif name in meta_names:
        signature[name] = "constexpr"
    else:
        signature[name] = "i32"
ptx = []
# (key mode, gathered queries, query tile, key tile, warps, register cap): the packed launch and the indexed one
# in the caller's token order (ranges mode and 64-row tiles compile too, checked by hand; few compiles keep this
# file quick).
for key_mode, gather_q, block_m, block_n, warps, maxnreg in ((0, False, 128, 64, 8, 128),
                                                             (2, True, 128, 64, 8, 128)):
    constexprs = dict(HEAD_DIM=128, BLOCK_M=block_m, LOG_R=9, KEY_MODE=key_mode, STORE_LSE=True, IEEE_DOT=False,
                      GATHER_Q=gather_q, BLOCK_N=block_n, KEY_WINDOW=16)
    try:
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    except TypeError as exc:
        print("SKIP another Triton API generation:", exc)
        sys.exit(0)
    options = {"num_warps": warps, "num_stages": 2, **({"maxnreg": maxnreg} if maxnreg else {})}
    ptx.append(triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"])
print("COMPILED", all("wgmma" in p for p in ptx))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernels themselves")
def test_kernel_compiles_for_hopper():
    """Compile the default launch to an sm_90 cubin without a GPU: catches errors the interpreter lets through."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE], capture_output=True, text=True, env=env,
                          timeout=300)
    if "SKIP" in done.stdout or "ptxas" in done.stderr and "No such file" in done.stderr:
        pytest.skip(done.stdout + done.stderr[-500:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "COMPILED True" in done.stdout  # the tiles use Hopper tensor cores (wgmma)


def test_autotune_times_each_key_modes_own_candidates():
    """The indexed walk is tuned over its own list (three-stage pipelines), the other walks over theirs."""
    from vidaccel.kernels import varblock_attention as vba

    configs = vba._varblock_attn_fwd_tuned.configs
    for mode, table in (("indexed", vba._INDEXED_TUNING_CANDIDATES), ("packed", vba._TUNING_CANDIDATES)):
        kept = vba._prune_configs(configs, {"BLOCK_M": 128, "KEY_MODE": vba.KEY_MODES[mode]})
        assert sorted(map(vba._config_key, kept), key=str) == sorted(
            (vba._config_key(c.as_triton()) for c in table[128]), key=str)
