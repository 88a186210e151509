"""``QuantizedEmbedding``: a drop-in replacement for ``nn.Embedding`` whose table is stored in a low-bit format.

A token embedding is a large table read a few hundred rows at a time (UMT5-XXL: 256,384 x 4,096 = 1.05 B values,
2.1 GB in bf16, of which one prompt touches at most 512 rows). The table is kept packed, one row per token:

- ``int8``: symmetric per row, one fp32 scale per token (:func:`formats.quantize_int8`);
- ``int4``: asymmetric RTN in groups of ``group_size`` consecutive values of a row (:func:`formats.quantize_int4`).

A lookup gathers the codes and scales of the requested rows only and dequantizes those, so a forward pass costs
``tokens x embedding_dim`` work and never rebuilds the table. Gathering rows and dequantizing them is elementwise
per row, so the result is bit-identical to indexing the fully dequantized table.

Forward semantics follow ``nn.Embedding`` without gradients: the output has the compute dtype (the original
weight's dtype, following ``.to(dtype)``), shape ``(*input.shape, embedding_dim)``, and out-of-range indices
raise. ``padding_idx`` only changes gradients in ``nn.Embedding``; it is kept as an attribute, and an all-zero
padding row (the usual case) stays exactly zero in both formats. ``max_norm`` rewrites the table during lookup,
which a packed table cannot do, so such embeddings are not converted.
"""

from __future__ import annotations

import torch
from torch import nn

from . import formats

EMBEDDING_FORMATS: tuple[str, ...] = ("int8", "int4")


def _checked_format(fmt: str) -> str:
    if fmt not in EMBEDDING_FORMATS:
        raise ValueError(f"unknown embedding format {fmt!r}; known: {', '.join(EMBEDDING_FORMATS)}")
    return fmt


def conversion_error(embedding: nn.Embedding, fmt: str, group_size: int = 64) -> str | None:
    """Why ``embedding`` cannot become a :class:`QuantizedEmbedding` in ``fmt`` (None when it can)."""
    _checked_format(fmt)
    if embedding.max_norm is not None:
        return "max_norm renormalises the table in place during lookup, which a packed table cannot do"
    if fmt == "int4" and embedding.embedding_dim % group_size:
        return f"embedding_dim={embedding.embedding_dim} is not a multiple of the int4 group size {group_size}"
    return None


# Float values quantized per step when packing a table (16 M: 64 MB of float32 per temporary).
CHUNK_VALUES = 1 << 24


def _quantize_rows(weight: torch.Tensor, fmt: str, group_size: int) -> formats.PackedWeight:
    return formats.quantize_int8(weight) if fmt == "int8" else formats.quantize_int4(weight, group_size)


def _quantize_rows_chunked(weight: torch.Tensor, fmt: str, group_size: int, rows_per_chunk: int) -> formats.PackedWeight:
    """:func:`_quantize_rows` of the whole table, ``rows_per_chunk`` rows at a time (every tensor is per row)."""
    rows = weight.shape[0]
    if rows <= rows_per_chunk:
        return _quantize_rows(weight, fmt, group_size)
    first = _quantize_rows(weight[:rows_per_chunk], fmt, group_size)
    storage = {
        name: torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device) for name, t in first.tensors.items()
    }
    for name, t in first.tensors.items():
        storage[name][:rows_per_chunk] = t
    del first
    for start in range(rows_per_chunk, rows, rows_per_chunk):
        part = _quantize_rows(weight[start : start + rows_per_chunk], fmt, group_size)
        for name, t in part.tensors.items():
            storage[name][start : start + t.shape[0]] = t
    block = weight.shape[1] if fmt == "int8" else group_size
    return formats.PackedWeight(fmt, tuple(weight.shape), block, storage)


class QuantizedEmbedding(nn.Module):
    """An embedding table with packed low-bit rows (see the module docstring)."""

    def __init__(
        self,
        packed: formats.PackedWeight,
        *,
        compute_dtype: torch.dtype,
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        self.format = _checked_format(packed.format)
        self.num_embeddings, self.embedding_dim = packed.shape
        self.block_size = packed.block_size
        self.padding_idx = padding_idx
        self._storage_names = tuple(packed.tensors)
        for name, tensor in packed.tensors.items():
            self.register_buffer(name, tensor.contiguous())
        # Zero-size tensor whose dtype and device follow ``.to()`` like a float weight would: the compute dtype.
        self.register_buffer("_dtype_marker", torch.empty(0, dtype=compute_dtype), persistent=False)

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, fmt: str, group_size: int = 64, chunk_values: int = CHUNK_VALUES
    ) -> "QuantizedEmbedding":
        """Quantize ``embedding``'s table (on its own device); ``embedding`` itself is left untouched.

        Rows are quantized ``chunk_values // embedding_dim`` at a time into preallocated storage: every format here
        is row-local, so the result is bit-identical to quantizing the whole table at once, while the float32
        temporaries stay one chunk large (UMT5-XXL's table in one piece needed ~25 GB of scratch on the GPU).
        """
        reason = conversion_error(embedding, fmt, group_size)
        if reason is not None:
            raise ValueError(reason)
        weight = embedding.weight.detach()
        packed = _quantize_rows_chunked(weight, fmt, group_size, max(1, chunk_values // max(1, weight.shape[1])))
        return cls(packed, compute_dtype=weight.dtype, padding_idx=embedding.padding_idx)

    # ------------------------------------------------------------------------------------------------------
    @property
    def packed(self) -> formats.PackedWeight:
        tensors = {name: getattr(self, name) for name in self._storage_names}
        return formats.PackedWeight(self.format, (self.num_embeddings, self.embedding_dim), self.block_size, tensors)

    @property
    def weight(self) -> torch.Tensor:
        """A value-less stand-in (device "meta") with the table's shape and compute dtype.

        Code that only inspects ``.weight`` (its dtype or shape) keeps working; reading values from it fails
        loudly. Use :meth:`dequantized_weight` for values.
        """
        return torch.empty((self.num_embeddings, self.embedding_dim), dtype=self._dtype_marker.dtype, device="meta")

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole table, dequantized (for checks; the forward pass never builds it)."""
        return formats.dequantize_weight(self.packed, dtype or self._dtype_marker.dtype)

    def parameter_bytes(self) -> int:
        """Bytes this table really holds: codes and scales."""
        return self.packed.nbytes()

    def extra_repr(self) -> str:
        parts = [f"{self.num_embeddings}", f"{self.embedding_dim}", f"format={self.format}"]
        if self.format == "int4":
            parts.append(f"group_size={self.block_size}")
        if self.padding_idx is not None:
            parts.append(f"padding_idx={self.padding_idx}")
        return ", ".join(parts)

    def _apply(self, fn, recurse=True):
        # ``module.to(torch.bfloat16)`` would cast the fp32/fp16 scales too. Keep the storage in its own dtypes
        # (moving devices only) and let the compute dtype follow.
        before = {name: self._buffers[name] for name in self._storage_names}
        result = super()._apply(fn, recurse)
        for name, tensor in before.items():
            after = self._buffers[name]
            if after.dtype != tensor.dtype:
                self._buffers[name] = tensor.to(device=after.device)
        return result

    # ------------------------------------------------------------------------------------------------------
    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Embedding's argument name
        if input.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"embedding indices must be int32 or int64, got {input.dtype}")
        flat = input.reshape(-1)
        if flat.numel():
            # Checked here because an out-of-range gather on CUDA is a device-side assert that poisons the context.
            lo, hi = torch.aminmax(flat)
            if int(lo) < 0 or int(hi) >= self.num_embeddings:
                raise IndexError(f"embedding index out of range [0, {self.num_embeddings})")
        rows = formats.PackedWeight(
            self.format,
            (flat.numel(), self.embedding_dim),
            self.block_size,
            {name: getattr(self, name).index_select(0, flat) for name in self._storage_names},
        )
        out = formats.dequantize_weight(rows, self._dtype_marker.dtype)
        return out.reshape(*input.shape, self.embedding_dim)
