"""QuantizedLinear: packed buffers, exact dequantizing forward, dtype/device handling, true byte counts."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vidaccel.text_encoder import formats
from vidaccel.text_encoder.quantized_linear import (
    BACKEND_DEQUANT,
    BACKEND_NOT_RUN,
    METHODS,
    QuantizedLinear,
    required_multiple,
)


def _linear(inp=256, out=96, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = nn.Linear(inp, out, bias=bias)
    return layer.to(dtype)


# relative output error each format should stay under on a random Gaussian layer
LIMITS = {"int8": 0.01, "int8-sinq": 0.01, "fp8": 0.04, "int4": 0.15, "int4-sinq": 0.15, "nvfp4": 0.15, "mxfp4": 0.18, "nvint4": 0.13}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("hadamard", [None, 64])
def test_forward_equals_dequantized_matmul_and_is_close_to_float(method, hadamard):
    layer = _linear()
    q = QuantizedLinear.from_linear(layer, method, group_size=64, hadamard_block=hadamard)
    x = torch.randn(2, 5, 256)
    y = q(x)
    assert q.backend == BACKEND_DEQUANT
    # the effective weight (rotation and column scale undone) reproduces the forward exactly up to fp32 rounding
    assert torch.allclose(y, F.linear(x, q.dequantized_weight(), layer.bias), atol=1e-4, rtol=1e-4)
    ref = layer(x)
    assert ((y - ref).norm() / ref.norm()).item() < LIMITS[method]


def test_plain_forward_is_bitwise_the_dequantized_linear():
    layer = _linear()
    q = QuantizedLinear.from_linear(layer, "nvfp4")
    x = torch.randn(3, 256)
    w = formats.dequantize_weight(q.packed, torch.float32)
    assert torch.equal(q(x), F.linear(x, w, layer.bias))


def test_storage_is_buffers_and_no_float_weight_remains():
    q = QuantizedLinear.from_linear(_linear(), "int4-sinq", group_size=32)
    names = dict(q.named_buffers())
    assert set(names) == {"qweight", "scale", "zero", "col_scale", "bias", "_dtype_marker"}
    assert names["_dtype_marker"].numel() == 0
    assert list(q.parameters()) == []
    assert set(q.state_dict()) == {"qweight", "scale", "zero", "col_scale", "bias"}
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (96, 128)


@pytest.mark.parametrize("method,bits", [("int8", 8), ("int8-sinq", 8 + 32 / 128), ("fp8", 8), ("int4", 4.5), ("int4-sinq", 4.5 + 32 / 128),
                                         ("nvfp4", 4.5), ("mxfp4", 4.25), ("nvint4", 4.5)])
def test_parameter_bytes_are_the_real_bytes(method, bits):
    layer = _linear(inp=1024, out=128, bias=True)
    q = QuantizedLinear.from_linear(layer, method, group_size=64)
    actual = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert q.parameter_bytes() == actual
    weight_bytes = q.parameter_bytes() - 128 * 4  # minus the fp32 bias (SINQ adds an fp32 column scale)
    assert weight_bytes * 8 / (1024 * 128) == pytest.approx(bits, abs=0.06)
    assert q.parameter_bytes() < 0.3 * sum(p.numel() * 4 for p in layer.parameters())


def test_to_dtype_keeps_storage_dtypes_and_changes_compute_dtype():
    q = QuantizedLinear.from_linear(_linear(), "fp8")
    before = {k: (v.dtype, v.clone()) for k, v in q.state_dict().items() if k != "bias"}
    q = q.to(torch.bfloat16)
    for name, (dtype, value) in before.items():
        buf = getattr(q, name)
        assert buf.dtype == dtype
        assert torch.equal(buf.view(torch.uint8), value.view(torch.uint8))
    assert q.bias.dtype == torch.bfloat16
    assert q.weight.dtype == torch.bfloat16 and q.weight.device.type == "meta" and q.weight.shape == (96, 256)
    y = q(torch.randn(4, 256, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_weight_stand_in_follows_the_original_dtype_and_holds_no_values():
    q = QuantizedLinear.from_linear(_linear(dtype=torch.bfloat16), "int8")
    assert q.weight.dtype == torch.bfloat16 and q.weight.is_meta
    with pytest.raises((NotImplementedError, RuntimeError)):
        q.weight.sum().item()


def test_bf16_input_dequantizes_in_bf16():
    layer = _linear(dtype=torch.bfloat16)
    q = QuantizedLinear.from_linear(layer, "int4", group_size=64)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(q(x), F.linear(x, formats.dequantize_weight(q.packed, torch.bfloat16), layer.bias))


def test_no_bias_and_backend_bookkeeping():
    q = QuantizedLinear.from_linear(_linear(bias=False), "mxfp4")
    assert q.bias is None and q.backend == BACKEND_NOT_RUN
    q(torch.randn(1, 256))
    assert q.backend == BACKEND_DEQUANT
    assert "method=mxfp4" in repr(q)


def test_fp8_fast_path_is_not_taken_off_gpu():
    q = QuantizedLinear.from_linear(_linear(), "fp8")
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert not q._fp8_fast_path_applies(x)
    q(x)
    assert q.backend == BACKEND_DEQUANT and q.scaled_mm_error is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_scaled_mm_on_gpu_matches_the_dequantized_reference():
    layer = _linear(inp=512, out=256).cuda().to(torch.bfloat16)
    q = QuantizedLinear.from_linear(layer, "fp8")
    x = torch.randn(33, 512, device="cuda", dtype=torch.bfloat16)
    y = q(x)
    expected_fast = torch.cuda.get_device_capability() >= (8, 9)
    assert (q.backend == "fp8_scaled_mm") == (expected_fast and q.scaled_mm_error is None)
    ref = F.linear(x.float(), q.dequantized_weight(torch.float32), layer.bias.float())
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.05


def test_required_multiples_and_rejection():
    assert required_multiple("int8") == 1
    assert required_multiple("int4", 128) == 128
    assert required_multiple("nvfp4", 64, 128) == 128
    assert required_multiple("mxfp4", 64, 16) == 32
    with pytest.raises(ValueError, match="multiple of 64"):
        QuantizedLinear.from_linear(nn.Linear(96, 8), "int4", group_size=64)
    with pytest.raises(ValueError, match="unknown"):
        QuantizedLinear.from_linear(nn.Linear(64, 8), "int2")


def test_state_dict_round_trip_into_a_fresh_module():
    q = QuantizedLinear.from_linear(_linear(), "nvint4", hadamard_block=32)
    q2 = QuantizedLinear.from_linear(_linear(seed=1), "nvint4", hadamard_block=32)
    q2.load_state_dict(q.state_dict())
    x = torch.randn(2, 256)
    assert torch.equal(q(x), q2(x))


@pytest.mark.parametrize("method", ["int8", "int8-sinq"])
def test_fp32_model_runs_its_activations_in_fp32(method):
    """No bf16 detour on the CPU path: the fp32 forward is bitwise the fp32 matmul with the fp32 dequantized
    weight (after the SINQ column scale on the activation's input features)."""
    layer = _linear(inp=256, out=96)
    q = QuantizedLinear.from_linear(layer, method)
    x = torch.randn(4, 256)
    h = x if q.col_scale is None else x * q.col_scale
    w = formats.dequantize_weight(q.packed, torch.float32)
    assert w.dtype == torch.float32 and q.packed.tensors["scale"].dtype == torch.float32
    assert torch.equal(q(x), F.linear(h, w, layer.bias))
    assert q(x).dtype == torch.float32
    if q.col_scale is not None:
        assert q.col_scale.shape == (256,)  # one per input feature
