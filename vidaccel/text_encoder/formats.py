"""Weight formats for low-precision text encoders: quantize and dequantize as pure functions.

Every format works on a 2-D weight ``W`` of shape ``(out_features, in_features)`` and scales along the input
dimension, so a scale block is a run of consecutive input columns of one output row. The result is a
:class:`PackedWeight`: the real storage (4-bit codes packed two per byte, 8-bit codes, scales) plus the metadata
needed to dequantize. Quantization math runs in float32 whatever the weight's dtype; dequantization returns the
dtype the caller asks for (the activation dtype at run time).

Formats (``bits`` are per weight, scales included, for a 4096-wide row):

=========  ===============================================================================  ======
int8       per-row symmetric: ``q = round(w / s)`` in [-127, 127], ``s = amax_row / 127`` (fp32)  8.01
fp8        per-row E4M3: ``q = e4m3(w / s)`` saturating at 448, ``s = amax_row / 448`` (fp32)     8.01
int4       asymmetric RTN per group of g in {32, 64, 128}: ``s = (max - min) / 15``,              4.5 (g64)
           ``z = round(-min / s)``, ``q = clip(round(w / s) + z, 0, 15)``; s and z in fp16
nvfp4      E2M1 values, blocks of 16, block scale ``e4m3(amax_blk / 6 / S)`` times the tensor    4.5
           scale ``S = amax_tensor / (448 * 6)`` (fp32)
mxfp4      E2M1 values, blocks of 32, power-of-two scale ``2^(floor(log2 amax_blk) - 2)`` stored  4.25
           as an E8M0 byte (biased exponent)
nvint4     NVFP4's scale encoding with integer values in [-7, 7]: the block scale targets 7       4.5
           instead of 6 (``e4m3(amax_blk / 7 / S)``, ``S = amax_tensor / (448 * 7)``)
=========  ===============================================================================  ======

Range search (``search_range=True`` for int8 and int4; off by default here, on by default for the text-encoder
methods that use it, see ``quantized_linear.RANGE_SEARCH_METHODS``): instead of the full range, try the range
end points scaled towards zero by each factor of :data:`INT8_RANGE_FACTORS` (int8) or :data:`RANGE_FACTORS`
(int4, the two ends independently) and keep, per row (int8) or per group (int4), the candidate whose
dequantized values have the least squared error.
The full range is one candidate and wins ties, so the error never exceeds plain RTN's; the stored bits, the
grids and the dequantization are unchanged (int4 zero points stay integers).
"""

from __future__ import annotations

import dataclasses
import math

import torch

FORMATS: tuple[str, ...] = ("int8", "fp8", "int4", "nvfp4", "mxfp4", "nvint4")
INT4_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
NVINT4_BLOCK = 16

E4M3_MAX = 448.0
E2M1_MAX = 6.0
NVINT4_MAX = 7.0
# E2M1 magnitudes indexed by their 3-bit code (1 exponent-bias-1 format: 2 exponent bits, 1 mantissa bit).
E2M1_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E8M0_BIAS = 127
# 255 is E8M0's NaN; the smallest usable exponent is -127 (byte 0).
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127
# fp16 keeps the int4 scales and zero points; scales are floored at its smallest normal so that a group of tiny
# weights never gets a zero (or precision-starved subnormal) scale. The absolute error this adds is < 3.1e-5.
_FP16_TINY = torch.finfo(torch.float16).tiny
# Range search: factors the range end points are scaled by (1.0 first: plain RTN wins ties). int8's 255 levels
# gain only from trimming a few percent, so its grid is finer; int4 searches both ends of each group range.
INT8_RANGE_FACTORS: tuple[float, ...] = tuple(1.0 - 0.01 * i for i in range(51))  # 1.0, 0.99, ..., 0.5
RANGE_FACTORS: tuple[float, ...] = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0, 0.95, ..., 0.5
# Rows per chunk of the search, so that its temporaries stay near this many elements whatever the weight's size.
_SEARCH_CHUNK_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """Quantized storage of one weight matrix.

    ``tensors`` holds the real data (names depend on ``format``); ``block_size`` is how many consecutive input
    columns share one scale (``in_features`` for the per-row formats).
    """

    format: str
    shape: tuple[int, int]
    block_size: int
    tensors: dict[str, torch.Tensor]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.shape[0] * self.shape[1])


# ----------------------------------------------------------------------------------------------------------
# Small building blocks, exposed because tests and other formats check against them.


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (values 0..15, last dim even) two per uint8: element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of 4-bit codes ({codes.shape[-1]}) two per byte")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 ``(..., n)`` to codes ``(..., 2n)`` as uint8."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (ties to even mantissa, saturating at +-6); return 4-bit codes.

    Code layout: bit 3 is the sign, bits 0..2 index :data:`E2M1_GRID`. Zero always gets the positive code.
    """
    a = x.abs()
    # Each comparison crosses one midpoint of the grid; ">=" where the upper neighbour has the even code
    # (round-half-to-even on the mantissa bit), ">" where the lower one has it.
    mag = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75)
        + (a > 1.25)
        + (a >= 1.75)
        + (a > 2.5)
        + (a >= 3.5)
        + (a > 5.0)
    ).to(torch.uint8)
    sign = ((x < 0) & (mag > 0)).to(torch.uint8)
    return mag | (sign << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes to float32 values."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    mag = grid[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -mag, mag)


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even into float8_e4m3fn (|x| clamped to 448 first: no NaN)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def e8m0_encode(exponent: torch.Tensor) -> torch.Tensor:
    """Integer exponents to E8M0 bytes (bias 127), clamped to the representable range."""
    return (exponent.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP) + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(byte: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes to the float32 power of two they encode."""
    return torch.exp2(byte.to(torch.float32) - E8M0_BIAS)


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2(x))`` for positive finite float32 ``x`` (via frexp, immune to log2 rounding)."""
    _, exponent = torch.frexp(x)
    return exponent.to(torch.int32) - 1


def _as_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    out_features, in_features = w.shape
    return w.reshape(out_features, in_features // block, block)


def _checked_weight(weight: torch.Tensor, block: int | None = None) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or inf; refusing to quantize it")
    if block is not None and weight.shape[1] % block:
        raise ValueError(f"in_features={weight.shape[1]} is not a multiple of the block size {block}")
    return weight.detach().to(torch.float32)


def safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    # A zero scale only occurs for an all-zero row/block; dividing by 1 then yields the zero codes we want.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _divide_blocks(w: torch.Tensor, block: int, scale: torch.Tensor) -> torch.Tensor:
    """``w / scale`` per block, with 0 where the block scale is 0 (all-zero or underflowed block)."""
    blocks = _as_blocks(w, block)
    scaled = blocks / safe_divisor(scale)[..., None]
    return torch.where(scale[..., None] > 0, scaled, torch.zeros_like(scaled))


# ----------------------------------------------------------------------------------------------------------
# int8 / fp8 per output row


def _chunk_rows(row_elements: int) -> int:
    return max(1, _SEARCH_CHUNK_ELEMENTS // max(1, row_elements))


def int8_searched_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-row int8 scale ``f * amax_row / 127`` with ``f`` in :data:`INT8_RANGE_FACTORS` of least squared
    error."""
    scale = w.abs().amax(dim=1) / 127.0
    step = _chunk_rows(w.shape[1])
    for start in range(0, w.shape[0], step):
        rows, full = w[start : start + step], scale[start : start + step]
        best_scale = full.clone()
        best_err = torch.full_like(full, float("inf"))
        for factor in INT8_RANGE_FACTORS:
            s = full * factor
            d = safe_divisor(s)[:, None]
            err = ((torch.round(rows / d).clamp(-127, 127) * d - rows) ** 2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
        scale[start : start + step] = best_scale
    return scale


def int8_scale(w: torch.Tensor, search_range: bool = False) -> torch.Tensor:
    """Per-row int8 scale: ``amax_row / 127``, or the range-searched one."""
    return int8_searched_scale(w) if search_range else w.abs().amax(dim=1) / 127.0


def quantize_int8(weight: torch.Tensor, search_range: bool = False) -> PackedWeight:
    w = _checked_weight(weight)
    scale = int8_scale(w, search_range)
    q = torch.round(w / safe_divisor(scale)[:, None]).clamp(-127, 127).to(torch.int8)
    return PackedWeight("int8", tuple(w.shape), w.shape[1], {"qweight": q, "scale": scale})


def dequantize_int8(packed: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    t = packed.tensors
    return (t["qweight"].to(torch.float32) * t["scale"][:, None]).to(dtype)


def fp8_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-row E4M3 scale ``amax_row / 448``."""
    return w.abs().amax(dim=1) / E4M3_MAX


def quantize_fp8(weight: torch.Tensor) -> PackedWeight:
    w = _checked_weight(weight)
    scale = fp8_scale(w)
    q = e4m3_round(w / safe_divisor(scale)[:, None])
    return PackedWeight("fp8", tuple(w.shape), w.shape[1], {"qweight": q, "scale": scale})


def dequantize_fp8(packed: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    t = packed.tensors
    return (t["qweight"].to(torch.float32) * t["scale"][:, None]).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# int4 asymmetric round-to-nearest per group


def int4_group_params(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) fp16 scale and zero point of asymmetric 4-bit RTN, shapes ``(out, in / group_size)``.

    ``s = (max - min) / 15``, ``z = round(-min / s)``, both rounded to fp16 before use so that the stored values
    are the ones the codes were computed with. The scale is floored at ``amax_group / 2048`` so that ``|z|``
    stays an integer fp16 holds exactly; that floor only binds for groups whose spread is below 0.7% of their
    magnitude, e.g. a constant group, which then comes back within fp16 rounding of its scale.
    """
    blocks = _as_blocks(w, group_size)
    return _int4_range_params(blocks.amin(dim=-1), blocks.amax(dim=-1))


def _int4_range_params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    magnitude = torch.maximum(lo.abs(), hi.abs())
    scale = torch.maximum((hi - lo) / 15.0, magnitude / 2048.0)
    scale = scale.clamp(_FP16_TINY, torch.finfo(torch.float16).max).to(torch.float16)
    zero = torch.round(-lo / scale.to(torch.float32)).clamp(-2048, 2048).to(torch.float16)
    return scale, zero


def _int4_codes(blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    s = scale.to(torch.float32)[..., None]
    return (torch.round(blocks / s) + zero.to(torch.float32)[..., None]).clamp(0, 15)


def int4_searched_params(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`int4_group_params` of the range ``[a * min, b * max]`` with ``a, b`` in :data:`RANGE_FACTORS`
    that gives each group the least squared error (fp16 scale, integer fp16 zero point, as stored)."""
    blocks = _as_blocks(w, group_size)
    scale, zero = int4_group_params(w, group_size)
    step = _chunk_rows(w.shape[1] * len(RANGE_FACTORS))
    for start in range(0, w.shape[0], step):
        stop = start + step
        x = blocks[start:stop]
        lo, hi = x.amin(dim=-1), x.amax(dim=-1)
        best_s, best_z = scale[start:stop].clone(), zero[start:stop].clone()
        best_err = torch.full(lo.shape, float("inf"), device=w.device)
        his = torch.tensor(RANGE_FACTORS, device=w.device)[:, None, None] * hi  # (factors, rows, groups)
        for a in RANGE_FACTORS:
            s, z = _int4_range_params(lo * a, his)
            deq = (_int4_codes(x, s, z) - z.to(torch.float32)[..., None]) * s.to(torch.float32)[..., None]
            err, k = ((deq - x) ** 2).sum(dim=-1).min(dim=0)  # the first of equal errors: the wider range
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s.gather(0, k[None])[0], best_s)
            best_z = torch.where(better, z.gather(0, k[None])[0], best_z)
        scale[start:stop], zero[start:stop] = best_s, best_z
    return scale, zero


def quantize_int4(weight: torch.Tensor, group_size: int = 64, search_range: bool = False) -> PackedWeight:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    w = _checked_weight(weight, group_size)
    params = int4_searched_params if search_range else int4_group_params
    scale, zero = params(w, group_size)
    q = _int4_codes(_as_blocks(w, group_size), scale, zero).reshape(w.shape)
    return PackedWeight(
        "int4", tuple(w.shape), group_size, {"qweight": pack_nibbles(q), "scale": scale, "zero": zero}
    )


def dequantize_int4(packed: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    t = packed.tensors
    q = _as_blocks(unpack_nibbles(t["qweight"]).to(torch.float32), packed.block_size)
    w = (q - t["zero"].to(torch.float32)[..., None]) * t["scale"].to(torch.float32)[..., None]
    return w.reshape(packed.shape).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Microscaling 4-bit formats


def nv_tensor_scale(w: torch.Tensor, qmax: float) -> torch.Tensor:
    """The per-tensor fp32 scale ``amax_tensor / (448 * qmax)`` of NVFP4 / NVINT4 (1 for an all-zero tensor)."""
    amax = w.abs().amax()
    return amax / (E4M3_MAX * qmax) if amax > 0 else torch.ones((), device=w.device)


def nv_block_scale(block_amax: torch.Tensor, qmax: float, tensor_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales ``e4m3(amax_blk / qmax / S)``.

    amax_blk <= amax_tensor, so the ratio is <= 448 and the E4M3 cast only rounds (it can underflow to 0 for
    blocks far below the tensor's maximum; those blocks then quantize to zero instead of dividing by zero)."""
    return e4m3_round(block_amax / qmax / tensor_scale)


def _nv_scales(w: torch.Tensor, block: int, qmax: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4-style two-level scales: (per-tensor fp32 scale, E4M3 block scales, effective fp32 block scales)."""
    tensor_scale = nv_tensor_scale(w, qmax)
    block_scale = nv_block_scale(_as_blocks(w, block).abs().amax(dim=-1), qmax, tensor_scale)
    effective = block_scale.to(torch.float32) * tensor_scale
    return tensor_scale.reshape(1).to(torch.float32), block_scale, effective


def quantize_nvfp4(weight: torch.Tensor) -> PackedWeight:
    w = _checked_weight(weight, NVFP4_BLOCK)
    tensor_scale, block_scale, effective = _nv_scales(w, NVFP4_BLOCK, E2M1_MAX)
    codes = e2m1_encode(_divide_blocks(w, NVFP4_BLOCK, effective)).reshape(w.shape)
    return PackedWeight(
        "nvfp4",
        tuple(w.shape),
        NVFP4_BLOCK,
        {"qweight": pack_nibbles(codes), "block_scale": block_scale, "tensor_scale": tensor_scale},
    )


def dequantize_nvfp4(packed: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    t = packed.tensors
    values = _as_blocks(e2m1_decode(unpack_nibbles(t["qweight"])), packed.block_size)
    scale = t["block_scale"].to(torch.float32) * t["tensor_scale"]
    return (values * scale[..., None]).reshape(packed.shape).to(dtype)


def mxfp4_exponent(block_amax: torch.Tensor) -> torch.Tensor:
    """The OCP MX scale exponent ``floor(log2 amax_blk) - 2`` (int32; the smallest one for an all-zero block).

    The block's largest element lands in [4, 8) before E2M1 rounding, so values above 6 saturate to 6."""
    return torch.where(
        block_amax > 0,
        floor_log2(torch.where(block_amax > 0, block_amax, torch.ones_like(block_amax))) - 2,
        torch.full_like(block_amax, E8M0_MIN_EXP, dtype=torch.int32),
    )


def mxfp4_searched_exponent(blocks: torch.Tensor) -> torch.Tensor:
    """Per block of ``blocks`` ``(..., block)``: of the OCP exponent (:func:`mxfp4_exponent`) and the next one
    up, which cannot saturate (``amax_blk / 2^e <= 4 < 6``), the one whose E2M1 rounding of the block has the
    least squared error; ties keep the OCP exponent. Where the OCP scale saturates nothing (``amax / s <= 6``) it
    always wins: the coarser grid's points up to 6 are a subset of its own.

    Used by GPTQ (``gptq.Mxfp4Columns``), whose error feedback must not push a block's values into saturation;
    the data-free :func:`quantize_mxfp4` keeps the OCP rule."""
    exponent = mxfp4_exponent(blocks.abs().amax(dim=-1))

    def error(e: torch.Tensor) -> torch.Tensor:
        s = e8m0_decode(e8m0_encode(e))[..., None]
        return ((e2m1_decode(e2m1_encode(blocks / s)) * s - blocks) ** 2).sum(dim=-1)

    up = (exponent + 1).clamp(max=E8M0_MAX_EXP)
    return torch.where(error(up) < error(exponent), up, exponent)


def quantize_mxfp4(weight: torch.Tensor) -> PackedWeight:
    w = _checked_weight(weight, MXFP4_BLOCK)
    block_amax = _as_blocks(w, MXFP4_BLOCK).abs().amax(dim=-1)
    # OCP MX rule: the largest element lands in [4, 8) before E2M1 rounding, so values above 6 saturate.
    scale_byte = e8m0_encode(mxfp4_exponent(block_amax))
    scaled = _as_blocks(w, MXFP4_BLOCK) / e8m0_decode(scale_byte)[..., None]
    codes = e2m1_encode(scaled).reshape(w.shape)
    return PackedWeight(
        "mxfp4", tuple(w.shape), MXFP4_BLOCK, {"qweight": pack_nibbles(codes), "scale_e8m0": scale_byte}
    )


def dequantize_mxfp4(packed: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    t = packed.tensors
    values = _as_blocks(e2m1_decode(unpack_nibbles(t["qweight"])), packed.block_size)
    return (values * e8m0_decode(t["scale_e8m0"])[..., None]).reshape(packed.shape).to(dtype)


def quantize_nvint4(weight: torch.Tensor) -> PackedWeight:
    w = _checked_weight(weight, NVINT4_BLOCK)
    tensor_scale, block_scale, effective = _nv_scales(w, NVINT4_BLOCK, NVINT4_MAX)
    values = torch.round(_divide_blocks(w, NVINT4_BLOCK, effective)).clamp(-NVINT4_MAX, NVINT4_MAX)
    codes = (values + 8).reshape(w.shape)  # offset binary: code 8 is zero, 1..15 are -7..7
    return PackedWeight(
        "nvint4",
        tuple(w.shape),
        NVINT4_BLOCK,
        {"qweight": pack_nibbles(codes), "block_scale": block_scale, "tensor_scale": tensor_scale},
    )


def dequantize_nvint4(packed: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    t = packed.tensors
    values = unpack_nibbles(t["qweight"]).to(torch.float32) - 8
    values = _as_blocks(values, packed.block_size)
    scale = t["block_scale"].to(torch.float32) * t["tensor_scale"]
    return (values * scale[..., None]).reshape(packed.shape).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Dispatch

_QUANTIZERS = {
    "int8": quantize_int8,
    "fp8": quantize_fp8,
    "nvfp4": quantize_nvfp4,
    "mxfp4": quantize_mxfp4,
    "nvint4": quantize_nvint4,
}
_DEQUANTIZERS = {
    "int8": dequantize_int8,
    "fp8": dequantize_fp8,
    "int4": dequantize_int4,
    "nvfp4": dequantize_nvfp4,
    "mxfp4": dequantize_mxfp4,
    "nvint4": dequantize_nvint4,
}


def required_multiple(fmt: str, group_size: int = 64) -> int:
    """The number ``in_features`` must be a multiple of for ``fmt`` (1 for the per-row formats)."""
    if fmt in ("int8", "fp8"):
        return 1
    if fmt == "int4":
        return group_size
    return {"nvfp4": NVFP4_BLOCK, "mxfp4": MXFP4_BLOCK, "nvint4": NVINT4_BLOCK}[_known(fmt)]


def _known(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    return fmt


def quantize_weight(
    weight: torch.Tensor, fmt: str, group_size: int = 64, search_range: bool = False
) -> PackedWeight:
    """Quantize a 2-D weight into ``fmt`` (``group_size`` only matters for int4; ``search_range``, see the
    module docstring, only for int8 and int4)."""
    if _known(fmt) == "int4":
        return quantize_int4(weight, group_size, search_range)
    if fmt == "int8":
        return quantize_int8(weight, search_range)
    if search_range:
        raise ValueError(f"range search applies to int8 and int4, not {fmt!r}")
    return _QUANTIZERS[fmt](weight)


def dequantize_weight(packed: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild the weight from its packed storage in ``dtype``."""
    return _DEQUANTIZERS[_known(packed.format)](packed, dtype)


def packed_nbytes(fmt: str, out_features: int, in_features: int, group_size: int = 64) -> int:
    """Bytes :func:`quantize_weight` will store for a weight of this shape (no tensor needed)."""
    n = out_features * in_features
    if _known(fmt) in ("int8", "fp8"):
        return n + 4 * out_features
    codes = math.ceil(n / 2)
    if fmt == "int4":
        return codes + 2 * 2 * (n // group_size)
    if fmt == "mxfp4":
        return codes + n // MXFP4_BLOCK
    return codes + n // NVFP4_BLOCK + 4  # nvfp4 / nvint4: E4M3 byte per block + fp32 tensor scale
