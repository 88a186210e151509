"""Weight formats against float references: grids, block scales, scale encodings, saturation, packing."""

import pytest
import torch

from vidaccel.text_encoder import formats as F

E2M1 = torch.tensor(F.E2M1_GRID)


def _weight(out=32, inp=256, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * scale


# ---------------------------------------------------------------------------------------------- building blocks


def test_nibble_packing_round_trips_every_code_and_halves_bytes():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 2)  # (3, 32)
    packed = F.pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert packed[0, 0].item() == 0x10  # element 0 low nibble, element 1 high nibble
    assert torch.equal(F.unpack_nibbles(packed), codes)
    with pytest.raises(ValueError, match="odd"):
        F.pack_nibbles(torch.zeros(2, 3, dtype=torch.uint8))


def test_e2m1_grid_values_are_exact_and_decode_back():
    values = torch.cat((E2M1, -E2M1[1:]))
    assert torch.equal(F.e2m1_decode(F.e2m1_encode(values)), values)


def test_e2m1_rounds_to_nearest_with_ties_to_even_mantissa():
    x = torch.tensor([0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, -0.75, -2.6])
    expected = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -1.0, -3.0])
    assert torch.equal(F.e2m1_decode(F.e2m1_encode(x)), expected)


def test_e2m1_saturates_and_never_produces_negative_zero_codes():
    x = torch.tensor([6.0, 7.0, 1e6, -1e6, -0.1, 0.0])
    codes = F.e2m1_encode(x)
    assert torch.equal(F.e2m1_decode(codes), torch.tensor([6.0, 6.0, 6.0, -6.0, 0.0, 0.0]))
    assert codes[-2].item() == 0 and codes[-1].item() == 0  # -0.1 rounds to +0's code


def test_e4m3_round_saturates_instead_of_nan():
    x = torch.tensor([1000.0, -1e9, 448.0, 3.3, 2.0**-9, 2.0**-11])
    y = F.e4m3_round(x).to(torch.float32)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert y[0] == 448 and y[1] == -448 and y[2] == 448
    assert y[3] == 3.25  # 3 mantissa bits: 3.25 is the nearest representable value
    assert y[4] == 2.0**-9 and y[5] == 0  # smallest subnormal kept, below half of it flushes to zero


def test_e8m0_encoding_is_biased_exponent_and_clamped():
    exps = torch.tensor([-127, -1, 0, 1, 127, 200, -300], dtype=torch.int32)
    byte = F.e8m0_encode(exps)
    assert byte.dtype == torch.uint8
    assert byte.tolist() == [0, 126, 127, 128, 254, 254, 0]
    assert torch.equal(F.e8m0_decode(byte[1:4]), torch.tensor([0.5, 1.0, 2.0]))


def test_floor_log2_is_exact_around_powers_of_two():
    x = torch.tensor([1.0, 2.0, 3.99, 4.0, 0.5, 0.74, 2.0**-100])
    below = torch.nextafter(torch.tensor(8.0), torch.tensor(0.0)).reshape(1)
    got = F.floor_log2(torch.cat((x, below)))
    assert got.tolist() == [0, 1, 1, 2, -1, -1, -100, 2]


# ---------------------------------------------------------------------------------------------- per-row formats


def test_int8_matches_float_reference_exactly():
    w = _weight()
    packed = F.quantize_int8(w)
    scale = w.abs().amax(dim=1) / 127
    q_ref = torch.round(w / scale[:, None]).clamp(-127, 127)
    assert packed.tensors["qweight"].dtype == torch.int8
    assert torch.equal(packed.tensors["qweight"].to(torch.float32), q_ref)
    assert torch.equal(F.dequantize_int8(packed), q_ref * scale[:, None])
    err = (F.dequantize_int8(packed) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    # the row maximum is hit exactly (code +-127)
    assert packed.tensors["qweight"].abs().amax(dim=1).eq(127).all()


def test_fp8_matches_float_reference_and_keeps_row_max():
    w = _weight()
    w[0, 0] = 3.0
    packed = F.quantize_fp8(w)
    q = packed.tensors["qweight"]
    assert q.dtype == torch.float8_e4m3fn
    scale = w.abs().amax(dim=1) / 448
    ref = (w / scale[:, None]).to(torch.float8_e4m3fn).to(torch.float32) * scale[:, None]
    assert torch.equal(F.dequantize_fp8(packed), ref)
    assert F.dequantize_fp8(packed)[0, 0] == pytest.approx(3.0, rel=1e-6)
    # relative error of E4M3 (3 mantissa bits) for normal values: <= 2^-4
    big = w.abs() > scale[:, None] * 2**-6 * 448
    rel = ((F.dequantize_fp8(packed) - w).abs() / w.abs())[big]
    assert rel.max() <= 2**-4 + 1e-6


# ---------------------------------------------------------------------------------------------- int4


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_codes_lie_on_each_groups_grid(group):
    w = _weight(seed=group)
    packed = F.quantize_int4(w, group)
    t = packed.tensors
    assert t["qweight"].shape == (32, 128) and t["qweight"].dtype == torch.uint8
    assert t["scale"].shape == (32, 256 // group) and t["scale"].dtype == torch.float16
    q = F.unpack_nibbles(t["qweight"]).to(torch.float32).reshape(32, -1, group)
    s = t["scale"].to(torch.float32)
    z = t["zero"].to(torch.float32)
    # zero point is an integer and the scale is (max - min) / 15 up to fp16 rounding
    assert torch.equal(z, torch.round(z))
    blocks = w.reshape(32, -1, group)
    span = blocks.amax(-1) - blocks.amin(-1)
    assert torch.allclose(s, span / 15, rtol=2**-10)
    # dequantized values are (code - z) * s, i.e. on the group's 16-point grid
    deq = F.dequantize_int4(packed).reshape(32, -1, group)
    assert torch.equal(deq, (q - z[..., None]) * s[..., None])
    # round to nearest: at most half a step off inside the range (plus one step where the edge code clips)
    err = (deq - blocks).abs() / s[..., None]
    assert err.max() <= 1.5
    assert (err <= 0.5 + 1e-4).float().mean() > 0.99


def test_int4_constant_zero_and_one_sided_groups():
    w = torch.zeros(2, 64)
    w[0, :32] = 0.37  # constant group
    w[1, :32] = torch.linspace(1.0, 1.01, 32)  # positive group far from zero: zero point < 0
    deq = F.dequantize_int4(F.quantize_int4(w, 32))
    assert torch.isfinite(deq).all()
    assert torch.allclose(deq[0, :32], w[0, :32], rtol=1e-3)
    assert torch.equal(deq[:, 32:], torch.zeros(2, 32))
    assert (deq[1, :32] - w[1, :32]).abs().max() <= 0.01 / 15


def test_int4_rejects_bad_groups():
    with pytest.raises(ValueError, match="group_size"):
        F.quantize_int4(_weight(), 48)
    with pytest.raises(ValueError, match="multiple"):
        F.quantize_int4(torch.randn(4, 96), 64)


# ---------------------------------------------------------------------------------------------- microscaling


def test_nvfp4_scales_and_values_match_float_reference():
    w = _weight(inp=128)
    packed = F.quantize_nvfp4(w)
    t = packed.tensors
    amax = w.abs().max()
    assert t["tensor_scale"].dtype == torch.float32
    assert t["tensor_scale"].item() == pytest.approx((amax / (448 * 6)).item(), rel=1e-7)
    assert t["block_scale"].dtype == torch.float8_e4m3fn and t["block_scale"].shape == (32, 8)
    block_amax = w.reshape(32, 8, 16).abs().amax(-1)
    ref_block = (block_amax / 6 / t["tensor_scale"]).to(torch.float8_e4m3fn)
    assert torch.equal(t["block_scale"].to(torch.float32), ref_block.to(torch.float32))
    scale = t["block_scale"].to(torch.float32) * t["tensor_scale"]
    deq = F.dequantize_nvfp4(packed).reshape(32, 8, 16)
    ref = F.e2m1_decode(F.e2m1_encode(w.reshape(32, 8, 16) / scale[..., None])) * scale[..., None]
    assert torch.equal(deq, ref)
    # the tensor maximum maps to E4M3 448 * E2M1 6 and comes back exactly
    i = w.abs().argmax()
    assert F.dequantize_nvfp4(packed).flatten()[i] == pytest.approx(w.flatten()[i].item(), rel=1e-6)


def test_nvfp4_saturates_when_the_e4m3_block_scale_rounds_down():
    w = torch.zeros(1, 32)
    w[0, 0] = 448.0 * 6  # tensor max: tensor scale 1, block scale 448
    w[0, 16] = 6 * 17.0  # block scale 17 -> E4M3 rounds to 16, so 102 / 16 = 6.375 must clamp to 6
    packed = F.quantize_nvfp4(w)
    assert packed.tensors["block_scale"].to(torch.float32)[0, 1].item() == 16.0
    deq = F.dequantize_nvfp4(packed)
    assert deq[0, 16].item() == 96.0 and torch.isfinite(deq).all()


def test_mxfp4_power_of_two_scale_and_e8m0_byte():
    w = torch.zeros(3, 64)
    w[0, :32] = torch.linspace(-5.0, 5.0, 32)  # amax 5: floor(log2 5) = 2 -> scale 2^0
    w[0, 32:] = torch.linspace(-0.3, 0.3, 32)  # amax 0.3: floor(log2 0.3) = -2 -> scale 2^-4
    w[1, :32] = 7.9  # 7.9 / 2^0 saturates to 6
    packed = F.quantize_mxfp4(w)
    byte = packed.tensors["scale_e8m0"]
    assert byte.dtype == torch.uint8
    assert byte[0].tolist() == [127, 123] and byte[1, 0].item() == 127
    assert byte[2].tolist() == [0, 0]  # all-zero blocks: smallest exponent, no NaN
    deq = F.dequantize_mxfp4(packed)
    assert deq[1, :32].eq(6.0).all()
    assert deq[0, 0].item() == -4.0  # -5 is a tie between 4 and 6: even mantissa (4)
    assert torch.equal(deq[2], torch.zeros(64))
    ref = F.e2m1_decode(F.e2m1_encode(w[0, 32:] / 2**-4)) * 2**-4
    assert torch.equal(deq[0, 32:], ref)


def test_nvint4_uses_nvfp4_scales_with_integers_up_to_seven():
    w = _weight(inp=64, seed=3)
    packed = F.quantize_nvint4(w)
    t = packed.tensors
    assert t["tensor_scale"].item() == pytest.approx((w.abs().max() / (448 * 7)).item(), rel=1e-7)
    assert t["block_scale"].dtype == torch.float8_e4m3fn
    scale = t["block_scale"].to(torch.float32) * t["tensor_scale"]
    values = F.dequantize_nvint4(packed).reshape(32, 4, 16) / scale[..., None]
    assert torch.allclose(values, torch.round(values), atol=1e-4)
    assert values.abs().max().round() == 7
    ref = torch.round(w.reshape(32, 4, 16) / scale[..., None]).clamp(-7, 7) * scale[..., None]
    assert torch.equal(F.dequantize_nvint4(packed).reshape(32, 4, 16), ref)


# ---------------------------------------------------------------------------------------------- all formats


@pytest.mark.parametrize("fmt", F.FORMATS)
def test_zero_weight_stays_zero_and_finite(fmt):
    packed = F.quantize_weight(torch.zeros(4, 128), fmt, 64)
    deq = F.dequantize_weight(packed, torch.bfloat16)
    assert deq.dtype == torch.bfloat16 and torch.equal(deq, torch.zeros(4, 128, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    "fmt,bits", [("int8", 8 + 32 / 256), ("fp8", 8 + 32 / 256), ("int4", 4.5), ("nvfp4", 4.5), ("mxfp4", 4.25),
                 ("nvint4", 4.5)]
)
def test_packed_sizes(fmt, bits):
    packed = F.quantize_weight(_weight(out=64, inp=256), fmt, 64)
    assert packed.nbytes() == F.packed_nbytes(fmt, 64, 256, 64)
    assert packed.bits_per_weight() == pytest.approx(bits, abs=0.01)


@pytest.mark.parametrize("fmt,limit", [("int8", 0.01), ("fp8", 0.03), ("int4", 0.12), ("nvfp4", 0.12),
                                       ("mxfp4", 0.15), ("nvint4", 0.11)])
def test_reconstruction_error_is_in_the_formats_range(fmt, limit):
    w = _weight(out=64, inp=512, seed=7)
    deq = F.dequantize_weight(F.quantize_weight(w, fmt, 64))
    rel = ((deq - w).norm() / w.norm()).item()
    assert rel < limit


def test_bad_inputs_are_rejected():
    w = _weight()
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        F.quantize_weight(w, "int8")
    with pytest.raises(ValueError, match="unknown weight format"):
        F.quantize_weight(_weight(), "int3")
    with pytest.raises(ValueError, match="2-D"):
        F.quantize_weight(torch.zeros(4), "fp8")
    with pytest.raises(ValueError, match="multiple"):
        F.quantize_weight(torch.zeros(4, 40), "mxfp4")


def test_low_precision_input_dtype_quantizes_like_its_float32_value():
    w = _weight().to(torch.bfloat16)
    a = F.quantize_weight(w, "nvfp4")
    b = F.quantize_weight(w.to(torch.float32), "nvfp4")
    assert all(torch.equal(a.tensors[k].view(torch.uint8), b.tensors[k].view(torch.uint8))
               for k in ("qweight", "block_scale"))
