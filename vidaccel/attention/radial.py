"""Radial Attention: the static block layout for video self-attention.

Token-level rule (query frame i, key frame j, d = |i - j|, within-frame indices r (query) and c (key),
tpf = tokens per frame, g = d.bit_length()):
  * d <= dense_near_frames: every pair is kept;
  * otherwise, with base = 2**tpf.bit_length() / 2**g:
      - base >= block: keep |c - r| <= w, w = max(base * decay, block);
      - base <  block: keep |c - r| <= block, but only when d is a multiple of int(block / base) (the
        authors' code writes 128 here, "equal to block-size": the two agree at 128-token blocks);
  * attention sink (Wan): every query sees the whole first video frame;
  * text tokens (joint attention): text rows see every key, every query sees the text keys.

Block layout. The sink frame and the text keys become exact ``dense_kv_ranges`` of the kernel (no block
rounding). For the rest, each (query block, key block) pair gets in O(1) the number of its video token pairs the
rule keeps (a closed-form count of lattice points in a band, per frame piece of each block), and is visited when
  * it holds any near-frame pair (d <= dense_near_frames: local motion is never cut), or
  * the kept fraction of its video token area is >= ``keep_threshold`` (default 0.4: a band block counts when
    a large part of it lies inside the band).
Query blocks holding any text token visit every key block. Blocks lying wholly inside a dense range are left to
the range pass. Everything is vectorised over block pairs on the target device: O(blocks^2), never O(tokens^2).
Results are cached (LRU) by (token layout, settings, device).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from ..kernels._block_layout import BlockLayout, normalize_kv_ranges
from ..layout import TokenLayout

__all__ = [
    "DEFAULT_DECAY",
    "DEFAULT_KEEP_THRESHOLD",
    "RadialPlan",
    "RadialTokenMasks",
    "TokenLayout",
    "radial_block_layout",
    "radial_layout_cache_clear",
    "radial_layout_cache_info",
    "radial_token_mask_reference",
]

DEFAULT_DECAY = 0.2  # the Radial Attention authors' setting for Wan
DEFAULT_KEEP_THRESHOLD = 0.4


# ------------------------------------------------------------------------------------------------------------
# The per-distance rule
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _DistanceRule:
    near: torch.Tensor  # bool (frames,): d <= dense_near_frames
    kept: torch.Tensor  # bool (frames,): far pair kept at all (the "every k-th far frame" rule)
    half_width: torch.Tensor  # int32 (frames,): band |c - r| <= half_width for kept far pairs


def _distance_rule(tpf: int, frames: int, decay: float, block: int, dense_near_frames: int,
                   device: torch.device) -> _DistanceRule:
    near, kept, width = [], [], []
    for d in range(frames):
        base = 2 ** tpf.bit_length() / 2 ** d.bit_length()
        near.append(d <= dense_near_frames)
        if base >= block:
            kept.append(True)
            width.append(int(max(base * decay, block)))
        else:
            kept.append(d % int(block / base) == 0)
            width.append(block)
    return _DistanceRule(torch.tensor(near, device=device), torch.tensor(kept, device=device),
                         torch.tensor(width, dtype=torch.int32, device=device))


def _pairs_at_or_below(r0, r1, c0, c1, t):
    """#{(r, c) : r0 <= r < r1, c0 <= c < c1, c - r <= t}, elementwise over broadcast integer tensors."""
    n = (c1 - c0).clamp_min(0)

    def cumulative(x):  # sum over y < x of clamp(y, 0, n); x * (x - 1) is even and >= 0, so >> 1 halves it
        x = x.clamp_min(0)
        tri = (x * (x - 1)) >> 1
        lin = ((n * (n + 1)) >> 1) + (x - n - 1) * n
        return torch.where(x <= n + 1, tri, lin)

    x0 = r0 + t - c0 + 1
    x1 = r1 + t - c0 + 1
    return torch.where(r1 > r0, cumulative(x1) - cumulative(x0), torch.zeros_like(x0))


def _band_pairs(r0, r1, c0, c1, w):
    """#{(r, c) in [r0, r1) x [c0, c1) : |c - r| <= w}."""
    return _pairs_at_or_below(r0, r1, c0, c1, w) - _pairs_at_or_below(r0, r1, c0, c1, -w - 1)


def _frame_pieces(num_blocks: int, block: int, tl: TokenLayout, device: torch.device):
    """Split each block's video tokens into per-frame pieces: frame, [lo, hi) within-frame range, validity.
    Shapes (num_blocks, P) with P the most frames one block can touch."""
    tpf, video, start = tl.tokens_per_frame, tl.video_tokens, tl.video_start
    pieces = -(-block // tpf) + 1
    b = torch.arange(num_blocks, device=device, dtype=torch.int32)
    s0 = (b * block - start).clamp(0, video)
    s1 = ((b + 1) * block - start).clamp(0, video)
    frame = (s0 // tpf).unsqueeze(1) + torch.arange(pieces, device=device, dtype=torch.int32)
    lo = torch.maximum(s0.unsqueeze(1), frame * tpf) - frame * tpf
    hi = torch.minimum(s1.unsqueeze(1), (frame + 1) * tpf) - frame * tpf
    valid = hi > lo
    return frame, lo.clamp_min(0), torch.where(valid, hi, lo.clamp_min(0)), valid


# ------------------------------------------------------------------------------------------------------------
# Plan
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class RadialPlan:
    """A Radial Attention layout ready for `block_sparse_attention(q, k, v, plan.layout,
    dense_kv_ranges=plan.dense_kv_ranges)` on ``token_layout.total_tokens`` tokens."""

    token_layout: TokenLayout
    layout: BlockLayout
    dense_kv_ranges: tuple[tuple[int, int], ...]
    decay: float
    attention_sink: bool
    dense_near_frames: int
    keep_threshold: float
    token_mask_density: float  # density of the token-level rule itself (exact, computed per frame pair)

    @functools.cached_property
    def density(self) -> float:
        """Fraction of token pairs the kernel computes (layout blocks and dense ranges, each pair once)."""
        return self.layout.effective_density(self.dense_kv_ranges)

    def report(self) -> dict:
        tl = self.token_layout
        return {
            "grid": [tl.frames, tl.height, tl.width],
            "text_tokens": tl.text_tokens,
            "text_position": tl.text_position,
            "tokens": tl.total_tokens,
            "block_size": self.layout.block_m,
            "blocks": self.layout.num_q_blocks,
            "decay": self.decay,
            "attention_sink": self.attention_sink,
            "keep_threshold": self.keep_threshold,
            "dense_kv_ranges": [list(r) for r in self.dense_kv_ranges],
            "block_density": round(self.layout.density, 4),
            "density": round(self.density, 4),
            "token_mask_density": round(self.token_mask_density, 4),
        }


def _dense_kv_ranges(tl: TokenLayout, attention_sink: bool) -> tuple[tuple[int, int], ...]:
    spans = []
    if attention_sink:
        spans.append((tl.video_start, tl.video_start + tl.tokens_per_frame))
    if tl.text_position == "before":
        spans.append((0, tl.text_tokens))
    elif tl.text_position == "after":
        spans.append((tl.video_tokens, tl.total_tokens))
    return normalize_kv_ranges(spans, tl.total_tokens)


def _token_mask_density(tl: TokenLayout, rule: _DistanceRule, attention_sink: bool) -> float:
    """Exact density of the token-level rule, summed per frame distance."""
    tpf, frames = tl.tokens_per_frame, tl.frames
    zero = torch.zeros((), dtype=torch.int64, device=rule.half_width.device)
    full = torch.full((), tpf, dtype=torch.int64, device=zero.device)
    per_pair = torch.where(rule.near, full * tpf,
                           torch.where(rule.kept, _band_pairs(zero, full, zero, full, rule.half_width),
                                       torch.zeros_like(rule.half_width)))
    d = torch.arange(frames, device=zero.device)
    pairs_at_distance = torch.where(d == 0, frames, 2 * (frames - d))
    video_pairs = float((per_pair * pairs_at_distance).sum())
    if attention_sink:  # frame 0 as a key for every query frame it would not already fully cover
        video_pairs += float(((~rule.near[torch.arange(frames, device=zero.device)]).long()
                              * (tpf * tpf - per_pair)).sum())
    text, total = tl.text_tokens, tl.total_tokens
    kept = video_pairs + text * total + tl.video_tokens * text
    return kept / (total * total)


def _build(tl: TokenLayout, decay: float, block: int, attention_sink: bool, dense_near_frames: int,
           keep_threshold: float, device: torch.device) -> RadialPlan:
    total = tl.total_tokens
    nb = -(-total // block)
    rule = _distance_rule(tl.tokens_per_frame, tl.frames, decay, block, dense_near_frames, device)
    frame, lo, hi, valid = _frame_pieces(nb, block, tl, device)

    # Broadcast to (query block, key block, query piece, key piece).
    fq, rq0, rq1, vq = (x[:, None, :, None] for x in (frame, lo, hi, valid))
    fk, ck0, ck1, vk = (x[None, :, None, :] for x in (frame, lo, hi, valid))
    both = vq & vk
    d = (fq - fk).abs().clamp_max(tl.frames - 1)
    near = rule.near[d] & both
    sink = (fk == 0) & attention_sink & ~near
    far = rule.kept[d] & both & ~near & ~sink
    width = rule.half_width[d]
    # Only piece pairs whose row range, widened by the band, meets the column range can hold band pairs.
    far &= (ck0 <= rq1 - 1 + width) & (ck1 - 1 >= rq0 - width)
    shape = far.shape
    area = (rq1 - rq0) * (ck1 - ck0)
    kept_pieces = torch.where(near, area, torch.zeros_like(area))
    sel = far.nonzero(as_tuple=True)
    pick = lambda x: x.expand(shape)[sel]  # noqa: E731
    kept_pieces[sel] = _band_pairs(pick(rq0), pick(rq1), pick(ck0), pick(ck1), width[sel])
    kept_pairs = kept_pieces.sum(dim=(2, 3))
    video_area = ((hi - lo) * valid).sum(-1)
    pair_area = video_area[:, None] * video_area[None, :]
    keep = near.any(dim=3).any(dim=2) | ((kept_pairs >= keep_threshold * pair_area) & (pair_area > 0) & (kept_pairs > 0))

    # Text rows attend to everything.
    tokens = torch.arange(nb, device=device, dtype=torch.int64) * block
    block_end = torch.clamp(tokens + block, max=total)
    if tl.text_tokens:
        text_lo, text_hi = (0, tl.text_tokens) if tl.text_position == "before" else (tl.video_tokens, total)
        has_text = (tokens < text_hi) & (block_end > text_lo)
        keep |= has_text[:, None]

    # Key blocks lying wholly inside a dense range are handled by the kernel's range pass.
    ranges = _dense_kv_ranges(tl, attention_sink)
    covered = torch.zeros(nb, dtype=torch.bool, device=device)
    for r_start, r_end in ranges:
        covered |= (tokens >= r_start) & (block_end <= r_end)
    keep &= ~covered[None, :]

    layout = BlockLayout.from_block_mask(keep.unsqueeze(0), block, block, q_len=total, kv_len=total)
    return RadialPlan(tl, layout, ranges, decay, attention_sink, dense_near_frames, keep_threshold,
                      _token_mask_density(tl, rule, attention_sink))


@functools.lru_cache(maxsize=32)
def _cached_build(tl: TokenLayout, decay: float, block: int, attention_sink: bool, dense_near_frames: int,
                  keep_threshold: float, device: str) -> RadialPlan:
    return _build(tl, decay, block, attention_sink, dense_near_frames, keep_threshold, torch.device(device))


def radial_block_layout(token_layout: TokenLayout, *, decay: float = DEFAULT_DECAY, block_size: int = 128,
                        attention_sink: bool = True, dense_near_frames: int = 1,
                        keep_threshold: float = DEFAULT_KEEP_THRESHOLD,
                        device: torch.device | str = "cpu") -> RadialPlan:
    """The Radial Attention plan (block layout + dense key ranges) for one token layout, cached."""
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    if block_size < 16 or block_size % 16:
        raise ValueError(f"block_size must be a positive multiple of 16, got {block_size}")
    if dense_near_frames < 0:
        raise ValueError(f"dense_near_frames must be >= 0, got {dense_near_frames}")
    if not 0 < keep_threshold <= 1:
        raise ValueError(f"keep_threshold must be in (0, 1], got {keep_threshold}")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _cached_build(token_layout, float(decay), int(block_size), bool(attention_sink), int(dense_near_frames),
                         float(keep_threshold), str(dev))


@dataclasses.dataclass(frozen=True)
class RadialCacheInfo:
    hits: int
    builds: int
    size: int
    maxsize: int


def radial_layout_cache_info() -> RadialCacheInfo:
    info = _cached_build.cache_info()
    return RadialCacheInfo(info.hits, info.misses, info.currsize, info.maxsize)


def radial_layout_cache_clear() -> None:
    _cached_build.cache_clear()


# ------------------------------------------------------------------------------------------------------------
# Token-level reference (tests, small sizes)
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RadialTokenMasks:
    """Token-level Radial masks (total x total, bool) and their parts."""

    mask: torch.Tensor  # everything the rule keeps
    near: torch.Tensor  # video pairs with d <= dense_near_frames
    far: torch.Tensor  # kept far video pairs, excluding sink-frame keys
    dense_columns: torch.Tensor  # (total,) keys every query sees: sink frame (if on) and text
    text_rows: torch.Tensor  # (total,) text queries


def radial_token_mask_reference(token_layout: TokenLayout, *, decay: float = DEFAULT_DECAY, block_size: int = 128,
                                attention_sink: bool = True, dense_near_frames: int = 1,
                                max_tokens: int = 16384) -> RadialTokenMasks:
    """The token-level rule evaluated pair by pair (O(tokens^2): small layouts only)."""
    tl = token_layout
    total, tpf = tl.total_tokens, tl.tokens_per_frame
    if total > max_tokens:
        raise ValueError(f"{total} tokens: the token-level reference is for small layouts (<= {max_tokens})")
    s = torch.arange(total)
    video_idx = s - tl.video_start
    is_video = (video_idx >= 0) & (video_idx < tl.video_tokens)
    f = torch.where(is_video, video_idx // tpf, torch.zeros_like(s))
    w = torch.where(is_video, video_idx % tpf, torch.zeros_like(s))
    d = (f[:, None] - f[None, :]).abs()
    both = is_video[:, None] & is_video[None, :]
    near = both & (d <= dense_near_frames)
    far = torch.zeros(total, total, dtype=torch.bool)
    for dist in range(dense_near_frames + 1, tl.frames):
        base = 2 ** tpf.bit_length() / 2 ** dist.bit_length()
        if base >= block_size:
            half_width, kept = int(max(base * decay, block_size)), True
        else:
            half_width, kept = block_size, dist % int(block_size / base) == 0
        if kept:
            far |= both & (d == dist) & ((w[None, :] - w[:, None]).abs() <= half_width)
    dense_columns = ~is_video
    if attention_sink:
        dense_columns |= is_video & (f == 0)
    far &= ~dense_columns[None, :]
    text_rows = ~is_video
    mask = near | far | dense_columns[None, :] | text_rows[:, None]
    return RadialTokenMasks(mask, near, far, dense_columns, text_rows)
