"""Radial Attention layout builder: agreement with the token-level rule, density, caching, odd grids."""

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidaccel.attention.radial import (
    DEFAULT_KEEP_THRESHOLD,
    TokenLayout,
    radial_block_layout,
    radial_layout_cache_clear,
    radial_layout_cache_info,
    radial_token_mask_reference,
)


def _expected_block_mask(masks, total, block, threshold):
    """Block reduction of the token-level masks, written directly on the (total x total) tensors."""
    nb = -(-total // block)
    keep = torch.zeros(nb, nb, dtype=torch.bool)
    video = ~masks.text_rows  # text rows == text columns positions
    for i in range(nb):
        rows = slice(i * block, min((i + 1) * block, total))
        for j in range(nb):
            cols = slice(j * block, min((j + 1) * block, total))
            area = int(video[rows].sum()) * int(video[cols].sum())
            kept = int((masks.near | masks.far)[rows, cols].sum())
            near_any = bool(masks.near[rows, cols].any())
            keep[i, j] = near_any or (area > 0 and kept > 0 and kept >= threshold * area)
        if masks.text_rows[rows].any():
            keep[i, :] = True
    for j in range(nb):
        if masks.dense_columns[j * block: min((j + 1) * block, total)].all():
            keep[:, j] = False
    return keep


layouts = st.builds(
    lambda f, h, w, text, pos: TokenLayout(f, h, w, text if pos != "none" else 0, pos),
    st.integers(1, 9), st.integers(1, 6), st.integers(1, 12), st.integers(1, 40),
    st.sampled_from(["none", "before", "after"]),
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(tl=layouts, block=st.sampled_from([16, 32]), decay=st.sampled_from([0.2, 0.5, 1.0]),
       sink=st.booleans(), near=st.integers(0, 2))
def test_layout_is_block_reduction_of_token_rule(tl, block, decay, sink, near):
    plan = radial_block_layout(tl, decay=decay, block_size=block, attention_sink=sink, dense_near_frames=near)
    masks = radial_token_mask_reference(tl, decay=decay, block_size=block, attention_sink=sink,
                                        dense_near_frames=near)
    expected = _expected_block_mask(masks, tl.total_tokens, block, DEFAULT_KEEP_THRESHOLD)
    assert torch.equal(plan.layout.block_mask()[0], expected)

    # What the kernel computes (layout blocks + dense ranges) covers every near pair, sink key and text pair.
    computed = plan.layout.to_dense_mask()[0].clone()
    for start, end in plan.dense_kv_ranges:
        computed[:, start:end] = True
    assert not (masks.near & ~computed).any()
    assert not (masks.dense_columns[None, :] & ~computed).any()
    assert not (masks.text_rows[:, None] & ~computed).any()
    assert plan.density == pytest.approx(computed.double().mean().item(), abs=1e-12)
    assert plan.token_mask_density == pytest.approx(masks.mask.double().mean().item(), abs=1e-12)


def test_token_rule_near_frames_symmetric_and_dense():
    tl = TokenLayout(6, 4, 5)
    masks = radial_token_mask_reference(tl, block_size=16, attention_sink=False)
    assert torch.equal(masks.mask, masks.mask.T)
    tpf = tl.tokens_per_frame
    for i in range(tl.frames):
        for j in range(max(0, i - 1), min(tl.frames, i + 2)):
            assert masks.mask[i * tpf:(i + 1) * tpf, j * tpf:(j + 1) * tpf].all()
    plan = radial_block_layout(tl, block_size=16, attention_sink=False)
    blocks = plan.layout.block_mask()[0]
    assert torch.equal(blocks, blocks.T)


def test_far_frames_follow_band_and_skip_rule():
    # tpf = 24: bit_length 5 -> base 32 / 2**g; with block 16, d = 2, 3 (g = 2, base 8) keep only even d.
    tl = TokenLayout(8, 4, 6)
    masks = radial_token_mask_reference(tl, block_size=16, attention_sink=False)
    tpf = tl.tokens_per_frame
    frame_pair = lambda i, j: masks.mask[i * tpf:(i + 1) * tpf, j * tpf:(j + 1) * tpf]  # noqa: E731
    assert frame_pair(0, 2).any() and not frame_pair(0, 3).any()
    assert frame_pair(0, 4).any() and not frame_pair(0, 5).any()  # d in 4..7: every 4th
    band = frame_pair(0, 2)
    r, c = torch.meshgrid(torch.arange(tpf), torch.arange(tpf), indexing="ij")
    assert torch.equal(band, (c - r).abs() <= 16)


def test_sink_and_text_are_exact_ranges():
    wan = radial_block_layout(TokenLayout(21, 30, 52))
    assert wan.dense_kv_ranges == ((0, 1560),)
    hunyuan = radial_block_layout(TokenLayout(33, 45, 80, 256, "after"), attention_sink=False)
    assert hunyuan.dense_kv_ranges == ((118800, 119056),)
    cog = radial_block_layout(TokenLayout(13, 30, 45, 226, "before"))
    assert cog.dense_kv_ranges == ((0, 226 + 1350),)  # text then the first video frame: merged
    # Query blocks holding text visit every key block not covered by a range.
    blocks = hunyuan.layout.block_mask()[0]
    # key blocks 929 and 930 hold only text tokens: the range covers them
    assert blocks[-1].sum() == hunyuan.layout.num_kv_blocks - 2 and not blocks[:, 929:].any()


def test_density_at_wan_sizes_lands_near_authors():
    d480 = radial_block_layout(TokenLayout(21, 30, 52)).density
    d720 = radial_block_layout(TokenLayout(21, 45, 80)).density
    assert 0.27 < d480 < 0.36
    assert 0.22 < d720 < 0.30
    assert d720 < d480  # longer frames decay relatively faster


def _authors_block_mask(tpf, frames, decay=0.2, block=128):
    """The Radial authors' block mask for Wan, re-derived from their published rule (DESIGN.md §6): per frame pair
    a token band (d == 1: half a frame wide; the first frame a sink), placed at its offset inside whole blocks; a
    block is kept when more than 60% of its non-empty columns are more than 1/3 full."""
    nb = tpf * frames // block
    final = torch.zeros(nb, nb, dtype=torch.bool)
    diff = (torch.arange(tpf)[None, :] - torch.arange(tpf)[:, None]).abs()
    per_frame_blocks = -(-tpf // block)
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            base = 2 ** tpf.bit_length() / 2 ** d.bit_length()
            if j == 0 or d == 0:
                local = torch.ones(tpf, tpf, dtype=torch.bool)
            elif d == 1:
                local = diff <= tpf // 2
            else:
                local = (diff <= max(base * decay, block)) & (base >= 128 or d % int(128 / base) == 0)
            r0, c0 = (i * tpf) % block, (j * tpf) % block
            n = r0 + per_frame_blocks * block
            padded = torch.zeros(n, c0 + per_frame_blocks * block, dtype=torch.bool)
            padded[r0:r0 + tpf, c0:c0 + tpf] = local
            m = padded[:per_frame_blocks * block, :per_frame_blocks * block]
            cols = m.view(per_frame_blocks, block, per_frame_blocks, block).sum(1).float() / block
            kept = (cols > 1 / 3).sum(-1) / ((cols > 0).sum(-1) + 1e-9) > 0.6
            bi, bj = i * tpf // block, j * tpf // block
            rows, width = min(per_frame_blocks, nb - bi), min(per_frame_blocks, nb - bj)
            final[bi:bi + rows, bj:bj + width] |= kept[:rows, :width]
    return final


def test_reference_model_size_matches_the_authors_block_rule():
    """At the shipped reference model's latent size (9 frames of 16x16 tokens) our layout, with the sink frame
    counted as blocks, is the authors' block mask exactly: its quality there is Radial's own, not our rounding."""
    plan = radial_block_layout(TokenLayout(9, 16, 16))
    ours = plan.layout.block_mask()[0].clone()
    start, end = plan.dense_kv_ranges[0]
    ours[:, start // 128: end // 128] = True
    authors = _authors_block_mask(256, 9)
    assert torch.equal(ours, authors)
    assert abs(plan.density - authors.float().mean().item()) < 1e-6


def test_cache_hits_after_first_build():
    radial_layout_cache_clear()
    tl = TokenLayout(5, 6, 7)
    first = radial_block_layout(tl, block_size=32)
    info = radial_layout_cache_info()
    assert (info.builds, info.hits) == (1, 0)
    for _ in range(3):
        assert radial_block_layout(tl, block_size=32) is first
    assert radial_layout_cache_info().builds == 1 and radial_layout_cache_info().hits == 3
    radial_block_layout(tl, block_size=32, decay=0.5)
    radial_block_layout(TokenLayout(5, 6, 8), block_size=32)
    assert radial_layout_cache_info().builds == 3


def test_odd_grid_builds_fast():
    start = time.perf_counter()
    plan = radial_block_layout(TokenLayout(16, 34, 60))
    elapsed = time.perf_counter() - start
    assert plan.layout.q_len == 16 * 34 * 60 and plan.layout.num_q_blocks == -(-16 * 34 * 60 // 128)
    assert 0 < plan.density < 1
    assert elapsed < 5.0


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        radial_block_layout(TokenLayout(2, 2, 2), decay=0.0)
    with pytest.raises(ValueError):
        radial_block_layout(TokenLayout(2, 2, 2), block_size=24)
