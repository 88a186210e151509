"""`BlockLayout`: which key blocks each query block visits, in padded CSR form.

Kept free of Triton so layout builders (vidaccel.attention.radial) can import it on any machine.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
    """Block-sparse attention pattern.

    ``kv_block_indices[g, i, :kv_block_counts[g, i]]`` are the key blocks (of ``block_n`` tokens) that query
    block ``i`` (of ``block_m`` tokens) visits in layout group ``g``; entries past the count are padding and
    never read. Indices within one row must be distinct. ``G`` (the first dimension) is 1 (one pattern for
    every head), ``heads`` (one per head, shared across the batch) or ``batch * heads`` (batch-major: group
    ``b * heads + h``); the kernel uses group ``(b * heads + h) % G``, which covers all three.

    ``q_len`` / ``kv_len`` are the token counts the layout was built for; the last block of each side may be
    ragged (shorter than its block size).
    """

    kv_block_indices: torch.Tensor  # int32 (G, num_q_blocks, max_kv_blocks)
    kv_block_counts: torch.Tensor  # int32 (G, num_q_blocks)
    block_m: int
    block_n: int
    q_len: int
    kv_len: int
    # Per-call schedules derived from this layout (see kernels.block_sparse_attention); not part of identity.
    _derived: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        idx, cnt = self.kv_block_indices, self.kv_block_counts
        if idx.dtype != torch.int32 or cnt.dtype != torch.int32:
            raise ValueError(f"kv_block_indices / kv_block_counts must be int32, got {idx.dtype} / {cnt.dtype}")
        if idx.dim() != 3 or cnt.dim() != 2 or tuple(idx.shape[:2]) != tuple(cnt.shape):
            raise ValueError(
                f"expected kv_block_indices (G, num_q_blocks, max_kv_blocks) and kv_block_counts (G, num_q_blocks), "
                f"got {tuple(idx.shape)} and {tuple(cnt.shape)}")
        if idx.device != cnt.device:
            raise ValueError("kv_block_indices and kv_block_counts must live on the same device")
        for name in ("block_m", "block_n"):
            size = getattr(self, name)
            if size < 16 or size % 16:
                raise ValueError(f"{name}={size}: block sizes must be positive multiples of 16")
        if self.q_len < 1 or self.kv_len < 1:
            raise ValueError(f"q_len and kv_len must be positive, got {self.q_len}, {self.kv_len}")
        if cnt.shape[1] != -(-self.q_len // self.block_m):
            raise ValueError(f"{cnt.shape[1]} query blocks do not cover q_len={self.q_len} with block_m={self.block_m}")

    # -- shape facts -------------------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return self.kv_block_counts.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_block_counts.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_n)

    @property
    def max_kv_blocks(self) -> int:
        return self.kv_block_indices.shape[2]

    @property
    def device(self) -> torch.device:
        return self.kv_block_indices.device

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, block_m: int = 128, block_n: Optional[int] = None, *,
                        q_len: Optional[int] = None, kv_len: Optional[int] = None) -> "BlockLayout":
        """Layout from a boolean (G, num_q_blocks, num_kv_blocks) mask (a 2D mask is taken as G = 1).

        ``q_len`` / ``kv_len`` default to whole blocks; pass the true token counts for ragged last blocks.
        """
        block_n = block_m if block_n is None else block_n
        if block_mask.dim() == 2:
            block_mask = block_mask.unsqueeze(0)
        if block_mask.dim() != 3 or block_mask.dtype != torch.bool:
            raise ValueError(f"block_mask must be bool (G, nq, nk), got {block_mask.dtype} {tuple(block_mask.shape)}")
        groups, nq, nk = block_mask.shape
        q_len = nq * block_m if q_len is None else q_len
        kv_len = nk * block_n if kv_len is None else kv_len
        if -(-kv_len // block_n) != nk:
            raise ValueError(f"{nk} key blocks do not cover kv_len={kv_len} with block_n={block_n}")
        counts = block_mask.sum(dim=-1, dtype=torch.int32)
        width = max(int(counts.max().item()) if counts.numel() else 0, 1)
        # Stable sort puts the kept block indices first, in increasing order.
        order = torch.argsort((~block_mask).to(torch.int8), dim=-1, stable=True)[..., :width]
        indices = torch.where(torch.arange(width, device=block_mask.device) < counts.unsqueeze(-1),
                              order, torch.zeros_like(order)).to(torch.int32).contiguous()
        return cls(indices, counts.contiguous(), block_m, block_n, q_len, kv_len)

    @classmethod
    def dense(cls, q_len: int, kv_len: int, block_m: int = 128, block_n: Optional[int] = None,
              device: torch.device | str = "cpu") -> "BlockLayout":
        """Every query block visits every key block (full attention through the sparse kernel)."""
        block_n = block_m if block_n is None else block_n
        nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
        return cls.from_block_mask(torch.ones(1, nq, nk, dtype=torch.bool, device=device), block_m, block_n,
                                   q_len=q_len, kv_len=kv_len)

    # -- views -------------------------------------------------------------------------------------------------
    def block_mask(self) -> torch.Tensor:
        """Boolean (G, num_q_blocks, num_kv_blocks) mask of the visited block pairs."""
        groups, nq, width = self.kv_block_indices.shape
        mask = torch.zeros(groups, nq, self.num_kv_blocks + 1, dtype=torch.bool, device=self.device)
        valid = torch.arange(width, device=self.device) < self.kv_block_counts.unsqueeze(-1)
        # Padding entries scatter into a spare last column that is dropped.
        target = torch.where(valid, self.kv_block_indices.long(), torch.full_like(self.kv_block_indices, self.num_kv_blocks, dtype=torch.long))
        mask.scatter_(-1, target, True)
        return mask[..., : self.num_kv_blocks]

    def to_dense_mask(self, q_len: Optional[int] = None, kv_len: Optional[int] = None) -> torch.Tensor:
        """Boolean (G, q_len, kv_len) token mask of the visited pairs (tests and small sizes only)."""
        q_len = self.q_len if q_len is None else q_len
        kv_len = self.kv_len if kv_len is None else kv_len
        blocks = self.block_mask()
        rows = torch.arange(q_len, device=self.device) // self.block_m
        cols = torch.arange(kv_len, device=self.device) // self.block_n
        return blocks[:, rows][:, :, cols]

    # -- density -----------------------------------------------------------------------------------------------
    def _block_extents(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.clamp(self.q_len - torch.arange(self.num_q_blocks, device=self.device) * self.block_m,
                           max=self.block_m)
        cols = torch.clamp(self.kv_len - torch.arange(self.num_kv_blocks, device=self.device) * self.block_n,
                           max=self.block_n)
        return rows.double(), cols.double()

    @functools.cached_property
    def density(self) -> float:
        """Fraction of the q_len x kv_len token pairs inside visited block pairs (ragged blocks count by their
        true area), averaged over layout groups."""
        rows, cols = self._block_extents()
        visited = (self.block_mask().double() * cols).sum(-1)  # (G, nq) tokens visited per query row
        return float((visited * rows).sum() / (self.num_groups * self.q_len * self.kv_len))

    def effective_density(self, dense_kv_ranges=None) -> float:
        """Fraction of token pairs attended when ``dense_kv_ranges`` (keys every query sees) are added to the
        layout: a pair counts once whether its block is visited, its key lies in a range, or both."""
        ranges = normalize_kv_ranges(dense_kv_ranges, self.kv_len)
        rows, cols = self._block_extents()
        in_range = torch.zeros(self.kv_len, dtype=torch.bool, device=self.device)
        for start, end in ranges:
            in_range[start:end] = True
        # Per key block: tokens outside every range (what the layout adds on top of the ranges).
        pad = self.num_kv_blocks * self.block_n - self.kv_len
        outside = torch.nn.functional.pad((~in_range).double(), (0, pad)).view(self.num_kv_blocks, self.block_n).sum(-1)
        range_tokens = float(in_range.sum())
        visited = (self.block_mask().double() * outside).sum(-1) + range_tokens
        return float((visited * rows).sum() / (self.num_groups * self.q_len * self.kv_len))


def normalize_kv_ranges(dense_kv_ranges, kv_len: int) -> tuple[tuple[int, int], ...]:
    """Validate (start, end) key-token ranges and merge overlapping or touching ones into sorted, disjoint
    ranges; empty ranges are dropped."""
    if not dense_kv_ranges:
        return ()
    spans = []
    for item in dense_kv_ranges:
        start, end = (int(x) for x in item)
        if start < 0 or end > kv_len or start > end:
            raise ValueError(f"dense_kv_ranges entry {item!r} is outside [0, kv_len={kv_len}] or reversed")
        if end > start:
            spans.append((start, end))
    spans.sort()
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((s, e) for s, e in merged)
