"""Range search for int8 rows and int4 groups: never worse than RTN, same grids and bits, the methods' default."""

import pytest
import torch
from torch import nn

from vidaccel.text_encoder import formats as F
from vidaccel.text_encoder.quantized_linear import RANGE_SEARCH_METHODS, QuantizedLinear
from vidaccel.text_encoder.sinq import dequantize_sinq, quantize_sinq


def _outlier_matrix(out=96, inp=256, seed=0):
    """Gaussian core, log-normal row/column scales, a few extreme rows, columns and single entries."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(out, inp, generator=g)
    rows = torch.exp(0.8 * torch.randn(out, generator=g))
    cols = torch.exp(0.8 * torch.randn(inp, generator=g))
    cols[torch.randperm(inp, generator=g)[:6]] *= 12.0
    rows[torch.randperm(out, generator=g)[:3]] *= 8.0
    w = 0.02 * core * rows[:, None] * cols[None, :]
    spikes = torch.randperm(out * inp, generator=g)[:20]
    w.view(-1)[spikes] *= 20.0
    return w


def _group_sq_err(w, deq, group):
    return ((deq - w) ** 2).reshape(w.shape[0], -1, group).sum(-1)


@pytest.mark.parametrize("seed", range(4))
def test_int8_search_never_increases_any_rows_error(seed):
    w = _outlier_matrix(seed=seed)
    rtn = F.dequantize_int8(F.quantize_int8(w))
    packed = F.quantize_int8(w, search_range=True)
    searched = F.dequantize_int8(packed)
    row_rtn, row_searched = ((rtn - w) ** 2).sum(1), ((searched - w) ** 2).sum(1)
    assert (row_searched <= row_rtn).all()
    # same grid: int8 codes in [-127, 127] times one fp32 scale per row, never above amax / 127
    q, scale = packed.tensors["qweight"], packed.tensors["scale"]
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (96,)
    assert q.to(torch.float32).abs().max() <= 127
    assert torch.equal(searched, q.to(torch.float32) * scale[:, None])
    assert (scale <= w.abs().amax(1) / 127).all()
    factors = scale / (w.abs().amax(1) / 127)
    assert factors.min() >= min(F.INT8_RANGE_FACTORS) - 1e-6


def test_int8_search_gains_on_heavy_tailed_rows():
    # 255 levels leave little to gain: trimming pays only where many values sit near the row maximum
    w = _student_t(64, 512)
    rtn = ((F.dequantize_int8(F.quantize_int8(w)) - w) ** 2).sum(1)
    searched = ((F.dequantize_int8(F.quantize_int8(w, search_range=True)) - w) ** 2).sum(1)
    assert (searched <= rtn).all() and (searched < rtn).sum() >= 8 and searched.sum() < rtn.sum()


def _student_t(out, inp, dof=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(out, inp, generator=g)
    chi2 = (torch.randn(out, inp, int(dof), generator=g) ** 2).sum(-1)
    return normal / torch.sqrt(chi2 / dof)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("seed", range(3))
def test_int4_search_never_increases_any_groups_error(group, seed):
    w = _outlier_matrix(seed=10 * seed + group)
    rtn = F.dequantize_int4(F.quantize_int4(w, group))
    packed = F.quantize_int4(w, group, search_range=True)
    searched = F.dequantize_int4(packed)
    err_rtn, err_searched = _group_sq_err(w, rtn, group), _group_sq_err(w, searched, group)
    assert (err_searched <= err_rtn).all()
    assert err_searched.sum() < 0.97 * err_rtn.sum()
    # same grid and storage: codes 0..15, fp16 scale and integer fp16 zero point per group
    t = packed.tensors
    assert t["scale"].dtype == torch.float16 and t["zero"].dtype == torch.float16
    assert packed.nbytes() == F.quantize_int4(w, group).nbytes() == F.packed_nbytes("int4", 96, 256, group)
    z = t["zero"].to(torch.float32)
    assert torch.equal(z, torch.round(z))
    q = F.unpack_nibbles(t["qweight"]).to(torch.float32).reshape(96, -1, group)
    expected = (q - z[..., None]) * t["scale"].to(torch.float32)[..., None]
    assert torch.equal(searched.reshape(96, -1, group), expected)


def test_sinq_search_is_never_worse_in_the_normalised_space_and_beats_rtn_in_w():
    w = _outlier_matrix(seed=7)
    for fmt, group in (("int4", 32), ("int4", 64), ("int4", 128), ("int8", 64)):
        plain, col = quantize_sinq(w, group, fmt=fmt)
        searched, col_s = quantize_sinq(w, group, fmt=fmt, search_range=True)
        assert torch.equal(col, col_s)  # the column scale does not depend on the range search
        normalised = w / col[None, :]
        e_plain = (F.dequantize_weight(plain) - normalised) ** 2
        e_searched = (F.dequantize_weight(searched) - normalised) ** 2
        block = group if fmt == "int4" else w.shape[1]
        assert (e_searched.reshape(96, -1, block).sum(-1) <= e_plain.reshape(96, -1, block).sum(-1)).all()
        if fmt == "int4":
            rtn = F.dequantize_int4(F.quantize_int4(w, group))
            err = lambda d: (d - w).norm() / w.norm()  # noqa: E731
            assert err(dequantize_sinq(searched, col)) < err(dequantize_sinq(plain, col)) < err(rtn)


def test_search_is_deterministic_and_keeps_zeros_and_constants():
    w = _outlier_matrix(out=16, inp=128, seed=3)
    w[2] = 0.0
    w[5, :64] = 0.37
    for search in (
        lambda x: F.dequantize_int4(F.quantize_int4(x, 64, search_range=True)),
        lambda x: F.dequantize_int8(F.quantize_int8(x, search_range=True)),
        lambda x: dequantize_sinq(*quantize_sinq(x, 64, search_range=True)),
    ):
        a, b = search(w), search(w.clone())
        assert torch.equal(a, b) and torch.isfinite(a).all()
        assert torch.equal(a[2], torch.zeros(128))
    deq = F.dequantize_int4(F.quantize_int4(w, 64, search_range=True))
    assert torch.allclose(deq[5, :64], w[5, :64], rtol=1e-3)


def test_large_weights_are_searched_in_chunks_with_the_same_result(monkeypatch):
    w = _outlier_matrix(out=64, inp=128, seed=9)
    whole4, whole8 = F.quantize_int4(w, 32, search_range=True), F.quantize_int8(w, search_range=True)
    monkeypatch.setattr(F, "_SEARCH_CHUNK_ELEMENTS", 700)  # a few rows per chunk
    for name in whole4.tensors:
        assert torch.equal(whole4.tensors[name], F.quantize_int4(w, 32, search_range=True).tensors[name])
    assert torch.equal(whole8.tensors["scale"], F.quantize_int8(w, search_range=True).tensors["scale"])


def test_search_applies_only_to_int8_and_int4():
    with pytest.raises(ValueError, match="range search"):
        F.quantize_weight(torch.randn(4, 32), "nvfp4", search_range=True)


@pytest.mark.parametrize("method", ["int8", "int8-sinq", "int4", "int4-sinq", "fp8"])
def test_range_search_is_the_default_of_int8_and_the_sinq_methods(method):
    torch.manual_seed(0)
    linear = nn.Linear(256, 48)
    with torch.no_grad():
        linear.weight.copy_(_outlier_matrix(out=48, inp=256, seed=5))
    layer = QuantizedLinear.from_linear(linear, method, group_size=64)
    explicit = QuantizedLinear.from_linear(linear, method, group_size=64, search_range=method in RANGE_SEARCH_METHODS)
    assert torch.equal(layer.dequantized_weight(), explicit.dequantized_weight())
    fmt = {"int8-sinq": "int8", "int4-sinq": "int4"}.get(method, method)
    if method == "int8":
        assert torch.equal(layer.packed.tensors["scale"], F.quantize_int8(linear.weight, True).tensors["scale"])
    if method == "int4":  # the RTN baseline stays plain round-to-nearest
        assert torch.equal(layer.dequantized_weight(), F.dequantize_int4(F.quantize_int4(linear.weight, 64)))
    if method.endswith("sinq"):
        packed, col = quantize_sinq(linear.weight, 64, fmt=fmt, search_range=True)
        assert torch.equal(layer.dequantized_weight(), dequantize_sinq(packed, col))
    assert method in RANGE_SEARCH_METHODS or method in ("int4", "fp8")
