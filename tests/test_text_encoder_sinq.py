"""SINQ dual scaling: balances tiles, beats plain RTN on outlier matrices, matches the DESIGN formula."""

import pytest
import torch

from vidaccel.text_encoder import formats as F
from vidaccel.text_encoder.sinq import (
    dequantize_sinq,
    quantize_sinq,
    sinkhorn_log_scales,
    std_imbalance,
)


def _outlier_matrix(out=128, inp=256, seed=0):
    """Gaussian core times log-normal row and column scales, plus a few extreme columns and rows."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(out, inp, generator=g)
    rows = torch.exp(0.8 * torch.randn(out, generator=g))
    cols = torch.exp(0.8 * torch.randn(inp, generator=g))
    cols[torch.randperm(inp, generator=g)[:6]] *= 12.0
    rows[torch.randperm(out, generator=g)[:3]] *= 8.0
    return 0.02 * core * rows[:, None] * cols[None, :]


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_sinq_beats_rtn_on_row_and_column_outliers(group):
    w = _outlier_matrix(seed=group)
    rtn = F.dequantize_int4(F.quantize_int4(w, group))
    sinq = dequantize_sinq(*quantize_sinq(w, group))
    assert _rel_err(sinq, w) < 0.8 * _rel_err(rtn, w)


def test_sinkhorn_reduces_imbalance_and_keeps_the_best():
    w = _outlier_matrix()
    tiles = w.reshape(128, 4, 64).transpose(0, 1)
    scales = sinkhorn_log_scales(tiles, 16)
    assert scales.row_log.shape == (4, 128) and scales.col_log.shape == (4, 64)
    assert (scales.imbalance <= scales.initial_imbalance).all()
    assert (scales.imbalance < 0.5 * scales.initial_imbalance).all()
    balanced = tiles / torch.exp(scales.row_log)[..., :, None] / torch.exp(scales.col_log)[..., None, :]
    assert torch.allclose(std_imbalance(balanced), scales.imbalance, rtol=1e-4)
    # column scales are centred: geometric mean 1 per tile
    assert torch.allclose(scales.col_log.mean(dim=-1), torch.zeros(4), atol=1e-5)


def test_implementation_matches_the_literal_design_formula():
    """W_hat = (q - z) * s * exp(mu_row) * exp(mu_col), with RTN on C = W / exp(mu_row) / exp(mu_col)."""
    w = _outlier_matrix(out=64, inp=128, seed=5).to(torch.float64)
    group = 64
    tiles = w.reshape(64, 2, group).transpose(0, 1)
    sc = sinkhorn_log_scales(tiles, 16)
    r = torch.exp(sc.row_log.to(torch.float64))[..., :, None]  # (tile, rows, 1)
    c = torch.exp(sc.col_log.to(torch.float64))[..., None, :]  # (tile, 1, cols)
    C = tiles / r / c
    lo, hi = C.amin(-1, keepdim=True), C.amax(-1, keepdim=True)
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    q = (torch.round(C / s) + z).clamp(0, 15)
    literal = ((q - z) * s * r * c).transpose(0, 1).reshape(64, 128)
    ours = dequantize_sinq(*quantize_sinq(w.to(torch.float32), group))
    # same codes up to fp16 storage of scales: differences are a small fraction of one step
    step = (s * r * c).transpose(0, 1).reshape(64, 128)
    diff = (ours.to(torch.float64) - literal).abs() / step
    assert (diff < 0.02).float().mean() > 0.99
    assert _rel_err(ours.to(torch.float64), w) == pytest.approx(_rel_err(literal, w), rel=0.02)


def test_no_iterations_is_plain_rtn():
    w = _outlier_matrix(seed=2)
    packed, col = quantize_sinq(w, 64, iterations=0)
    assert torch.equal(col, torch.ones(256))
    assert torch.equal(dequantize_sinq(packed, col), F.dequantize_int4(F.quantize_int4(w, 64)))


def test_zero_and_constant_rows_and_columns_stay_finite():
    w = _outlier_matrix(out=32, inp=128, seed=3)
    w[4] = 0.0
    w[:, 7] = 0.0
    w[9] = 0.25
    packed, col = quantize_sinq(w, 64)
    deq = dequantize_sinq(packed, col)
    assert torch.isfinite(col).all() and torch.isfinite(deq).all()
    assert torch.equal(deq[4], torch.zeros(128))
    others = torch.arange(32) != 9  # row 9 is constant 0.25, column 7 included
    assert (deq[others, 7] == 0).all()  # zero is exactly representable (integer zero point)
    # a constant row is no longer constant once columns are scaled: it gets round-to-nearest accuracy
    step = packed.tensors["scale"][9].to(torch.float32).repeat_interleave(64) * col
    assert ((deq[9] - 0.25).abs() <= 0.5 * step * 1.001 + 1e-7).all()


def test_storage_is_int4_plus_one_column_scale():
    packed, col = quantize_sinq(_outlier_matrix(), 64)
    assert packed.format == "int4" and packed.block_size == 64
    assert col.shape == (256,) and col.dtype == torch.float32
    with pytest.raises(ValueError, match="multiple"):
        quantize_sinq(torch.randn(8, 96), 64)


# ---------------------------------------------------------------------------------------------- int8 + SINQ


def test_int8_sinq_uses_the_whole_matrix_as_one_tile_and_beats_plain_int8():
    w = _outlier_matrix(seed=11)
    packed, col = quantize_sinq(w, iterations=16, fmt="int8")
    assert packed.format == "int8" and packed.block_size == 256 and col.shape == (256,)
    # int8 has one scale per whole row, so the balancing runs on the whole matrix
    expected = torch.exp(sinkhorn_log_scales(w[None], 16).col_log[0])
    assert torch.equal(col, expected)
    assert torch.equal(packed.tensors["qweight"], F.quantize_int8(w / col[None, :]).tensors["qweight"])
    plain = F.dequantize_int8(F.quantize_int8(w))
    assert _rel_err(dequantize_sinq(packed, col), w) < 0.8 * _rel_err(plain, w)


def test_int8_sinq_group_size_is_irrelevant_and_unknown_formats_are_refused():
    w = _outlier_matrix(out=32, inp=96, seed=4)  # 96 is no int4 group multiple: int8 does not care
    a, ca = quantize_sinq(w, 64, fmt="int8")
    b, cb = quantize_sinq(w, 32, fmt="int8")
    assert torch.equal(ca, cb) and torch.equal(a.tensors["qweight"], b.tensors["qweight"])
    with pytest.raises(ValueError, match="SINQ supports"):
        quantize_sinq(w, 32, fmt="nvfp4")
