"""GPTQ calibration: lower output error than RTN, same storage, deterministic, exact restore, clear errors."""

import json

import pytest
import torch
from torch import nn

from vidaccel.text_encoder import formats as F
from vidaccel.text_encoder import gptq as G
from vidaccel.text_encoder.eval import load_default_prompts
from vidaccel.text_encoder.quantize import TextEncoderQuant, quantize_text_encoder
from vidaccel.text_encoder.quantized_linear import METHODS, QuantizedLinear

transformers = pytest.importorskip("transformers")


def _correlated_layer(out=64, inp=256, tokens=1024, seed=0):
    """A linear layer and inputs with strongly correlated features of very different scales."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(inp, out)
    with torch.no_grad():
        linear.weight.copy_(0.05 * torch.randn(out, inp, generator=g))
        linear.bias.copy_(0.01 * torch.randn(out, generator=g))
    mix = torch.eye(inp) + 2.0 * torch.randn(inp, inp, generator=g) / inp**0.5
    x = (torch.randn(tokens, inp, generator=g) @ mix) * torch.exp(0.5 * torch.randn(inp, generator=g))
    return linear, x


def _output_error(linear, quantized, x):
    with torch.no_grad():
        return (linear(x) - quantized(x)).norm().item()


@pytest.mark.parametrize("method,group", [("int8", 64), ("int4", 64), ("int4-sinq", 64), ("int4-sinq", 32),
                                          ("nvfp4", 64), ("mxfp4", 64)])
def test_gptq_output_error_below_rtn_with_the_same_storage(method, group):
    linear, x = _correlated_layer()
    hessian = 2 * x.T @ x / x.shape[0]
    rtn = QuantizedLinear.from_linear(linear, method, group_size=group)
    gptq = G.quantize_linear_gptq(linear, method, hessian, group_size=group)
    assert _output_error(linear, gptq, x) < 0.8 * _output_error(linear, rtn, x)
    # same storage: names, dtypes, shapes, SINQ column scale, bias
    assert rtn.packed.tensors.keys() == gptq.packed.tensors.keys()
    for name, tensor in rtn.packed.tensors.items():
        assert gptq.packed.tensors[name].dtype == tensor.dtype and gptq.packed.tensors[name].shape == tensor.shape
    assert gptq.block_size == rtn.block_size and gptq.parameter_bytes() == rtn.parameter_bytes()
    if rtn.col_scale is not None:
        torch.testing.assert_close(gptq.col_scale, rtn.col_scale, atol=0, rtol=0)
    assert torch.equal(gptq.bias, rtn.bias)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("act_order", [False, True])
def test_diagonal_hessian_gives_exactly_the_data_free_result(method, act_order):
    linear, _ = _correlated_layer(out=32, inp=128, seed=1)
    # a diagonal Hessian (uncorrelated inputs) moves no error: GPTQ is round-to-nearest
    hessian = torch.diag(torch.linspace(0.5, 2.0, 128))
    rtn = QuantizedLinear.from_linear(linear, method, group_size=32)
    gptq = G.quantize_linear_gptq(linear, method, hessian, group_size=32, act_order=act_order)
    expected = rtn.packed.tensors
    if method == "mxfp4":  # GPTQ's MXFP4 exponent is the searched one, not OCP's: RTN with that scale byte
        blocks = linear.weight.detach().reshape(32, -1, F.MXFP4_BLOCK)
        scale_byte = F.e8m0_encode(F.mxfp4_searched_exponent(blocks))
        codes = F.e2m1_encode(blocks / F.e8m0_decode(scale_byte)[..., None]).reshape(linear.weight.shape)
        expected = {"qweight": F.pack_nibbles(codes), "scale_e8m0": scale_byte}
        assert not torch.equal(scale_byte, rtn.packed.tensors["scale_e8m0"])  # some blocks did go up
    for name, tensor in expected.items():
        assert torch.equal(gptq.packed.tensors[name], tensor), name


def test_mxfp4_searched_exponent_never_saturates_where_that_costs_more():
    g = torch.Generator().manual_seed(7)
    blocks = torch.randn(64, 8, F.MXFP4_BLOCK, generator=g) * torch.exp(torch.randn(64, 8, 1, generator=g))
    blocks[0, 0] = 0.0  # an all-zero block keeps the smallest exponent
    blocks[0, 1, :] = 0.01
    blocks[0, 1, 0] = 7.9  # OCP: 2^0, 7.9 saturates to 6; one up (scale 2) rounds 7.9 to 8 and the rest to 0
    ocp = F.mxfp4_exponent(blocks.abs().amax(dim=-1))
    searched = F.mxfp4_searched_exponent(blocks)
    assert int(ocp[0, 0]) == int(searched[0, 0]) == F.E8M0_MIN_EXP
    assert int(ocp[0, 1]) == 0 and int(searched[0, 1]) == 1

    def error(e):
        s = F.e8m0_decode(F.e8m0_encode(e))[..., None]
        return ((F.e2m1_decode(F.e2m1_encode(blocks / s)) * s - blocks) ** 2).sum(dim=-1)

    assert ((searched == ocp) | (searched == ocp + 1)).all()
    assert (error(searched) <= error(ocp)).all()
    # where OCP's scale saturates nothing it is kept; where the searched one differs, the block fits under 6 units
    amax = blocks.abs().amax(dim=-1)
    fits = amax <= 6.0 * F.e8m0_decode(F.e8m0_encode(ocp))
    assert torch.equal(searched[fits], ocp[fits]) and (searched != ocp).any()
    assert (amax[searched != ocp] <= 4.0 * F.e8m0_decode(F.e8m0_encode(searched[searched != ocp]))).all()
    # the data-free format keeps the OCP rule
    w = blocks.reshape(64, -1)
    assert torch.equal(F.quantize_mxfp4(w).tensors["scale_e8m0"], F.e8m0_encode(ocp))


def test_identity_like_hessian_is_close_to_rtn():
    linear, _ = _correlated_layer(out=32, inp=128, seed=2)
    g = torch.Generator().manual_seed(3)
    noise = 1e-4 * torch.randn(128, 128, generator=g)
    hessian = torch.eye(128) + noise @ noise.T
    for method in ("int8", "int4"):
        rtn = QuantizedLinear.from_linear(linear, method, group_size=64).dequantized_weight()
        gptq = G.quantize_linear_gptq(linear, method, hessian, group_size=64).dequantized_weight()
        assert (gptq - rtn).norm() < 1e-3 * rtn.norm()


def test_gptq_with_hadamard_matches_the_rotated_problem():
    linear, x = _correlated_layer(seed=4)
    hessian = 2 * x.T @ x / x.shape[0]
    rtn = QuantizedLinear.from_linear(linear, "int4", group_size=64, hadamard_block=64)
    gptq = G.quantize_linear_gptq(linear, "int4", hessian, group_size=64, hadamard_block=64)
    assert _output_error(linear, gptq, x) < 0.8 * _output_error(linear, rtn, x)


def test_gptq_is_deterministic():
    linear, x = _correlated_layer(seed=5)
    hessian = 2 * x.T @ x / x.shape[0]
    a = G.quantize_linear_gptq(linear, "int4-sinq", hessian)
    b = G.quantize_linear_gptq(linear, "int4-sinq", hessian)
    for name in a.packed.tensors:
        assert torch.equal(a.packed.tensors[name], b.packed.tensors[name])


def test_dead_inputs_and_singular_hessian_are_handled():
    linear, x = _correlated_layer(out=16, inp=64, seed=6)
    x[:, :8] = 0.0  # inputs that never fire
    x = x[:, :32].repeat(1, 2)  # and a rank-deficient Hessian
    hessian = 2 * x.T @ x / x.shape[0]
    q = G.quantize_linear_gptq(linear, "int8", hessian)
    assert torch.isfinite(q.dequantized_weight()).all()


# ---------------------------------------------------------------------------------------------- tiny encoders


def _tiny_bert(seed=0):
    from vidaccel.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer(model_max_length=64)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval(), tokenizer


def _tiny_umt5(seed=0):
    from vidaccel.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer(model_max_length=64)
    config = transformers.UMT5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    return transformers.UMT5EncoderModel(config).eval(), tokenizer


PROMPTS = [
    "a red circle moves left slowly in the dark forest",
    "camera pans over the city water at night bright light",
    "a small dog runs up the hill",
    "the man walks right while the woman runs, sky background, camera zooms slowly into the large scene",
]


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _encode(model, tokenizer):
    tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    return out[tokens["attention_mask"].bool()]


@pytest.mark.parametrize("build", [_tiny_bert, _tiny_umt5])
def test_calibrated_tiny_encoder_runs_and_restores_bit_exact(build):
    model, tokenizer = build()
    snapshot = _snapshot(model)
    ref = _encode(model, tokenizer)
    errors = {}
    for calibration in (None, "gptq"):
        config = TextEncoderQuant(method="int4", group_size=32, calibration=calibration,
                                  calibration_prompts=PROMPTS if calibration else None)
        result = quantize_text_encoder(model, config, tokenizer=tokenizer)
        assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in result.quantized_modules)
        errors[calibration] = (_encode(model, tokenizer) - ref).norm().item()
        if calibration:
            assert result.calibration["prompts"] == len(PROMPTS) and not result.calibration["uncalibrated"]
            assert result.calibration["stages"] >= 4 * 2  # qkv, attn out, ffn in, ffn out per layer
            assert result.summary()["calibration"]["method"] == "gptq"
        result.restore()
        state = model.state_dict()
        assert all(torch.equal(state[k], snapshot[k]) for k in snapshot)
        assert torch.equal(_encode(model, tokenizer), ref)
    # calibrated on the very prompts it is measured on: must beat RTN
    assert errors["gptq"] < errors[None]


def test_calibration_is_deterministic_and_keeps_training_flags():
    model, tokenizer = _tiny_bert(seed=1)
    model.train()
    config = TextEncoderQuant(method="int8", calibration="gptq", calibration_prompts=PROMPTS)
    packed = []
    for _ in range(2):
        result = quantize_text_encoder(model, config, tokenizer=tokenizer)
        assert model.training and all(m.training for m in model.modules())
        packed.append({n: {k: t.clone() for k, t in model.get_submodule(n).packed.tensors.items()}
                       for n in result.quantized_modules})
        result.restore()
    for name, tensors in packed[0].items():
        for key, tensor in tensors.items():
            assert torch.equal(tensor, packed[1][name][key]), (name, key)


def test_tiny_pipeline_with_calibration_restores_bit_exact(tiny_pipelines):
    import vidaccel
    from vidaccel.testing import tiny_call_kwargs

    pipe = tiny_pipelines["wan"]
    before = _snapshot(pipe.text_encoder)
    preset = vidaccel.Preset(text_encoder=TextEncoderQuant(method="int8", calibration="gptq",
                                                           calibration_prompts=PROMPTS))
    with vidaccel.apply(pipe, preset) as handle:
        frames = pipe(**{**tiny_call_kwargs("wan", steps=2), "output_type": "latent"}).frames
        stats = handle.stats()["text_encoder"]["text_encoder"]
    assert torch.isfinite(frames).all()
    assert stats["calibration"]["prompts"] == len(PROMPTS)
    after = pipe.text_encoder.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


# ---------------------------------------------------------------------------------------------- config & errors


def test_config_fields_round_trip_through_preset_files():
    from vidaccel.preset_files import config_from_dict, config_to_dict

    config = TextEncoderQuant(method="int4-sinq", calibration="gptq", calibration_prompts=["a", "b c"],
                              gptq_damp=0.05, gptq_act_order=False)
    assert config.calibration_prompts == ("a", "b c")
    data = json.loads(json.dumps(config_to_dict(config)))
    assert data["calibration"] == "gptq" and data["calibration_prompts"] == ["a", "b c"]
    assert config_from_dict("text_encoder", data) == config
    default = TextEncoderQuant()
    assert default.calibration is None and default.to_dict()["calibration"] is None
    assert config_from_dict("text_encoder", json.loads(json.dumps(config_to_dict(default)))) == default


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"calibration": "awq"}, "unknown calibration"),
        ({"calibration": "gptq", "calibration_prompts": []}, "empty"),
        ({"calibration": "gptq", "calibration_prompts": ["ok", ""]}, "non-empty"),
        ({"calibration_prompts": ["a prompt"]}, "calibration is None"),
        ({"calibration": "gptq", "gptq_damp": 0.0}, "gptq_damp"),
        ({"calibration": "gptq", "gptq_damp": float("nan")}, "gptq_damp"),
    ],
)
def test_bad_calibration_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextEncoderQuant(**kwargs)


def test_calibration_without_tokenizer_is_a_clear_error_and_touches_nothing():
    model, _ = _tiny_bert()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        quantize_text_encoder(model, TextEncoderQuant(calibration="gptq"))
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    state = model.state_dict()
    assert all(torch.equal(state[k], snapshot[k]) for k in snapshot)


def test_pipeline_without_tokenizer_is_a_clear_error():
    from vidaccel.text_encoder.method import TextEncoderQuantMethod

    class Pipe:
        text_encoder = _tiny_bert()[0]
        tokenizer = None

    class Adapter:
        pipe = Pipe()

        def text_encoders(self):
            return {"text_encoder": self.pipe.text_encoder}

    method = TextEncoderQuantMethod(TextEncoderQuant(calibration="gptq"))
    with pytest.raises(ValueError, match="tokenizer"):
        method.install(Adapter())
    assert not method.results


def test_shipped_calibration_prompts_are_disjoint_from_the_evaluation_set():
    calibration = G.load_calibration_prompts()
    assert len(calibration) >= 60 and len(set(calibration)) == len(calibration)
    assert not set(calibration) & set(load_default_prompts())
    assert max(len(p.split()) for p in calibration) > 200  # a few long prompts


def test_column_quantizer_rejects_unknown_formats_and_bad_search():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="unknown weight format"):
        G.column_quantizer(w, "int3")
    with pytest.raises(ValueError, match="range search"):
        G.column_quantizer(w, "nvfp4", search_range=True)
    assert F.required_multiple("int4", 64) == 64
