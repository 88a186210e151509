"""QuantizedEmbedding: exact row lookup, storage, nn.Embedding semantics; quantize_embeddings on a tiny UMT5."""

import gc
import importlib.util
import json
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from vidaccel.text_encoder import formats
from vidaccel.text_encoder.quantize import (
    DEFAULT_SKIP_MODULES,
    TextEncoderQuant,
    module_bytes,
    quantize_text_encoder,
)
from vidaccel.text_encoder.quantized_embedding import QuantizedEmbedding, conversion_error
from vidaccel.text_encoder.quantized_linear import METHODS

transformers = pytest.importorskip("transformers")

FORMATS = [("int8", 64), ("int4", 32), ("int4", 64)]


def _table(num=300, dim=128, padding_idx=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    embedding = nn.Embedding(num, dim, padding_idx=padding_idx)
    with torch.no_grad():
        embedding.weight.mul_(torch.linspace(0.01, 3.0, num)[:, None])  # rows of very different magnitudes
    return embedding.to(dtype)


# ---------------------------------------------------------------------------------------------- the module


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lookup_is_bit_exact_against_the_dequantized_table(fmt, group, dtype):
    embedding = _table(dtype=dtype)
    q = QuantizedEmbedding.from_embedding(embedding, fmt, group)
    ids = torch.tensor([[0, 5, 5, 299, 17, 1, 120], [3, 2, 1, 0, 298, 64, 65]])
    out = q(ids)
    assert out.shape == (2, 7, 128) and out.dtype == dtype
    assert torch.equal(out, q.dequantized_weight()[ids])
    assert torch.equal(q(ids.to(torch.int32)), out)
    assert q(torch.zeros(0, dtype=torch.long)).shape == (0, 128)


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_rows_are_within_half_a_quantization_step(fmt, group):
    embedding = _table()
    w = embedding.weight.detach()
    q = QuantizedEmbedding.from_embedding(embedding, fmt, group)
    err = (q.dequantized_weight(torch.float32) - w).abs()
    if fmt == "int8":  # symmetric, one scale per row (the lookup is per token, so is the scale): half a step
        bound = q.scale[:, None] / 2
    else:  # asymmetric: the rounded zero point adds up to another half step
        bound = q.scale.to(torch.float32).repeat_interleave(group, dim=1)
    assert (err <= bound * (1 + 1e-5) + 1e-7).all()
    assert err.max() > 0  # really quantized


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_packed_bytes_and_storage_dtypes(fmt, group):
    embedding = _table(num=256, dim=128)
    q = QuantizedEmbedding.from_embedding(embedding, fmt, group)
    expected = formats.packed_nbytes(fmt, 256, 128, group)
    assert expected == (256 * 128 + 4 * 256 if fmt == "int8" else 256 * 64 + 2 * 2 * 256 * 128 // group)
    assert q.parameter_bytes() == expected == module_bytes(q)
    assert list(q.parameters()) == []
    storage = {name: t.dtype for name, t in q.packed.tensors.items()}
    assert storage["qweight"] == (torch.int8 if fmt == "int8" else torch.uint8)
    q = q.to(torch.float16)  # the compute dtype follows, the codes and scales keep theirs
    assert {name: t.dtype for name, t in q.packed.tensors.items()} == storage
    assert q(torch.tensor([1, 2])).dtype == torch.float16
    assert q.weight.dtype == torch.float16 and q.weight.shape == (256, 128) and q.weight.device.type == "meta"


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_packing_is_bit_identical_to_packing_the_whole_table(fmt, group, dtype):
    embedding = _table(num=301, dim=128, dtype=dtype)  # 301 rows: the last chunk is partial
    whole = QuantizedEmbedding.from_embedding(embedding, fmt, group, chunk_values=10**9)
    chunked = QuantizedEmbedding.from_embedding(embedding, fmt, group, chunk_values=40 * 128)
    assert whole.packed.block_size == chunked.packed.block_size
    assert whole.packed.tensors.keys() == chunked.packed.tensors.keys()
    for name, t in whole.packed.tensors.items():
        c = chunked.packed.tensors[name]
        assert c.dtype == t.dtype and c.shape == t.shape
        assert torch.equal(c.view(torch.uint8), t.view(torch.uint8)), name


def test_padding_row_stays_exactly_zero():
    for fmt in ("int8", "int4"):
        q = QuantizedEmbedding.from_embedding(_table(padding_idx=7), fmt)
        assert q.padding_idx == 7
        assert torch.count_nonzero(q(torch.tensor([7, 7]))) == 0
        assert "padding_idx=7" in repr(q)


def test_invalid_inputs_and_tables_are_refused():
    q = QuantizedEmbedding.from_embedding(_table(), "int8")
    with pytest.raises(IndexError, match="out of range"):
        q(torch.tensor([300]))
    with pytest.raises(IndexError, match="out of range"):
        q(torch.tensor([-1]))
    with pytest.raises(TypeError, match="int32 or int64"):
        q(torch.tensor([1.0]))
    assert "max_norm" in conversion_error(nn.Embedding(10, 64, max_norm=1.0), "int8")
    assert "multiple" in conversion_error(nn.Embedding(10, 96), "int4", 64)
    assert conversion_error(nn.Embedding(10, 96), "int8") is None
    with pytest.raises(ValueError, match="multiple"):
        QuantizedEmbedding.from_embedding(nn.Embedding(10, 96), "int4", 64)
    with pytest.raises(ValueError, match="unknown embedding format"):
        QuantizedEmbedding.from_embedding(nn.Embedding(10, 64), "fp8")


# ---------------------------------------------------------------------------------------------- config


def test_config_field_and_embedding_method():
    assert TextEncoderQuant().quantize_embeddings is False
    expected = {"int8": "int8", "int8-sinq": "int8", "fp8": "int8"}
    for method in METHODS:
        assert TextEncoderQuant(method=method).embedding_method == expected.get(method, "int4")
    with pytest.raises(TypeError, match="quantize_embeddings"):
        TextEncoderQuant(quantize_embeddings=1)
    cfg = TextEncoderQuant(quantize_embeddings=True)
    assert cfg.skip_reason("shared") is not None  # the linear pass still ignores embedding names
    assert cfg.embedding_skip_reason("shared") is None
    assert cfg.embedding_skip_reason("encoder.block.0.layer.0.SelfAttention.relative_attention_bias")


# ---------------------------------------------------------------------------------------------- tiny UMT5


def _tiny_umt5(seed=0, vocab=512):
    config = transformers.UMT5Config(
        vocab_size=vocab, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    return transformers.UMT5EncoderModel(config).eval()


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


@pytest.mark.parametrize("method,min_cosine", [("int8", 0.999), ("int4-sinq", 0.97), ("nvfp4", 0.95)])
def test_umt5_tied_embedding_is_quantized_once_and_restored_bit_exact(method, min_cosine):
    model = _tiny_umt5()
    shared, embed_tokens = model.shared, model.encoder.embed_tokens
    assert shared is not embed_tokens and shared.weight is embed_tokens.weight  # transformers' tie
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    plain = quantize_text_encoder(model, TextEncoderQuant(method=method, group_size=32))
    plain_bytes = plain.bytes_after
    plain.restore()

    result = quantize_text_encoder(model, TextEncoderQuant(method=method, group_size=32, quantize_embeddings=True))
    assert sorted(result.quantized_embeddings) == ["encoder.embed_tokens", "shared"]
    assert model.shared is model.encoder.embed_tokens and isinstance(model.shared, QuantizedEmbedding)
    assert model.shared.format == TextEncoderQuant(method=method).embedding_method
    assert sorted(result.skipped_embeddings) == [
        f"encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias" for i in range(2)
    ]
    # The table is counted once: what it saves is exactly 512 x 128 fp32 values minus the packed table.
    assert plain_bytes - result.bytes_after == 512 * 128 * 4 - model.shared.parameter_bytes()
    assert result.summary()["quantized_embeddings"] == 2
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    assert _cosine(out, ref) > min_cosine

    result.restore()
    assert model.shared is shared and model.encoder.embed_tokens is embed_tokens
    assert model.shared.weight is model.encoder.embed_tokens.weight  # still tied
    assert all(torch.equal(v, state[k]) and v.dtype == state[k].dtype for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, ref)


def test_bf16_umt5_with_quantized_embedding_stays_bf16_and_close():
    model = _tiny_umt5().to(torch.bfloat16)
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        result = quantize_text_encoder(model, TextEncoderQuant(method="int8", quantize_embeddings=True))
        out = model(input_ids=ids).last_hidden_state
    assert out.dtype == torch.bfloat16 and _cosine(out, ref) > 0.995
    result.restore()


def test_dropping_originals_frees_the_tied_table_and_the_linear_weights():
    model = _tiny_umt5()
    table = weakref.ref(model.shared.weight)
    linear_weights = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, nn.Linear)]
    result = quantize_text_encoder(
        model, TextEncoderQuant(method="int4", quantize_embeddings=True, keep_originals_on_cpu=False)
    )
    gc.collect()
    # Nothing (slots, swaps, transformers' tie bookkeeping) keeps the full-precision tensors alive: the memory
    # the benchmark measures after quantizing really is the packed encoder.
    assert table() is None
    assert len(linear_weights) == 14 and all(ref() is None for ref in linear_weights)
    assert not result.can_restore


def test_tied_table_skipped_under_one_name_stays_in_use_there():
    model = _tiny_umt5()
    weight = model.shared.weight
    ids = torch.randint(0, 512, (1, 10))
    skip = (*DEFAULT_SKIP_MODULES, "encoder.embed_tokens")
    result = quantize_text_encoder(model, TextEncoderQuant(method="int8", quantize_embeddings=True, skip_modules=skip))
    assert result.quantized_embeddings == ["shared"]
    assert "skip pattern" in result.skipped_embeddings["encoder.embed_tokens"]
    assert type(model.encoder.embed_tokens) is nn.Embedding and model.encoder.embed_tokens.weight is weight
    with torch.no_grad():  # the encoder reads the full-precision table, the quantized one serves ``shared``
        assert torch.equal(model.encoder.embed_tokens(ids), weight[ids])
        assert not torch.equal(model.shared(ids), weight[ids])
        model(input_ids=ids)
    result.restore()
    assert model.shared.weight is weight


def test_embeddings_are_left_alone_by_default():
    model = _tiny_umt5()
    result = quantize_text_encoder(model, TextEncoderQuant(method="int4"))
    assert result.quantized_embeddings == [] and result.skipped_embeddings == {}
    assert type(model.shared) is nn.Embedding


# ---------------------------------------------------------------------------------------------- memory benchmark


def test_memory_benchmark_tiny_mode(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_text_encoder_memory.py"
    spec = importlib.util.spec_from_file_location("bench_text_encoder_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "memory.json"
    assert bench.main(["--tiny", "--out", str(out)]) == 0
    records = {rec["method"]: rec for rec in json.loads(out.read_text())}
    assert list(records) == ["bf16", "int8", "int8-sinq", "int4", "int4-sinq"]
    for rec in records.values():
        assert {"benchmark", "method", "date", "device", "shape", "bytes", "baseline_ms", "method_ms",
                "speedup"} <= rec.keys()
        assert rec["benchmark"] == "text_encoder_memory" and rec["device"] == "cpu"
        assert rec["shape"]["name"] == "umt5-tiny" and rec["bytes"] == rec["module_bytes"]
        assert rec["method_ms"] > 0 and rec["speedup"] == pytest.approx(rec["baseline_ms"] / rec["method_ms"], 1e-3)
    params = records["bf16"]["shape"]["params"]
    assert records["bf16"]["bytes"] == 2 * params  # built in bf16, nothing in fp32
    vocab, dim = 1024, 128
    assert records["int8"]["embedding_bytes"] == vocab * dim + 4 * vocab  # one table for the tied pair
    assert records["int4"]["embedding_bytes"] == vocab * dim // 2 + 2 * 2 * vocab * dim // 64
    assert records["int8"]["quantized_embeddings"] == ["shared", "encoder.embed_tokens"]
    assert records["int8"]["config"]["quantize_embeddings"] is True
    assert records["int4"]["bytes"] < records["int8"]["bytes"] < 0.52 * records["bf16"]["bytes"]
    assert records["int4"]["bytes"] < 0.29 * records["bf16"]["bytes"]
    assert records["int8"]["cosine_vs_bf16"] > 0.999 and records["int4-sinq"]["cosine_vs_bf16"] > 0.97
    assert "| int4-sinq |" in capsys.readouterr().out
    # exact accounting: the components add up to the encoder's tensors, which the packed-size formula predicts
    for rec in records.values():
        assert sum(c["bytes"] for c in rec["components"].values()) == rec["module_bytes"]
        assert rec["predicted_module_bytes"] == rec["module_bytes"] and rec["unaccounted_bytes"] == 0
    for method in ("int8", "int8-sinq", "int4", "int4-sinq"):
        components = records[method]["components"]
        assert "linear.float_weight" not in components and "embedding.float_table" not in components
        int8 = method.startswith("int8")
        assert components["embedding.packed.qweight"]["dtypes"] == ["torch.int8" if int8 else "torch.uint8"]
        assert ("linear.col_scale" in components) == method.endswith("sinq")
    assert records["bf16"]["components"]["embedding.float_table"]["bytes"] == 2 * vocab * dim


def test_memory_benchmark_predicts_full_size_umt5_xxl_bytes():
    """The formula behind the H100 table: 3.196 GB for int4 g64 with a packed table, as the H100 run's encoder held."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_text_encoder_memory.py"
    spec = importlib.util.spec_from_file_location("bench_text_encoder_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    xxl = bench.UMT5_XXL
    assert bench.predicted_module_bytes(xxl, None) == 11_361_820_672  # 5,680,910,336 params in bf16
    assert bench.predicted_module_bytes(xxl, bench.quant_config("int8")) == 5_686_117_888
    assert bench.predicted_module_bytes(xxl, bench.quant_config("int4")) == 3_195_871_232
    assert bench.predicted_module_bytes(xxl, bench.quant_config("int4-sinq")) == 3_199_213_568
    unpacked_table = TextEncoderQuant(method="int4", group_size=64)  # the default leaves the table in bf16
    assert bench.predicted_module_bytes(xxl, unpacked_table) == 3_195_871_232 - 590_708_736 + 2 * 256384 * 4096


def test_memory_benchmark_finds_tensors_the_encoder_does_not_own():
    """The check that would have caught the leaked table: a packed table kept alive outside the encoder."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_text_encoder_memory.py"
    spec = importlib.util.spec_from_file_location("bench_text_encoder_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    encoder = bench.build_encoder(bench.UMT5_TINY, "cpu")
    quantize_text_encoder(encoder, bench.quant_config("int4"))
    before = bench.device_tensors_outside(encoder, "cpu")
    other = bench.build_encoder(bench.UMT5_TINY, "cpu")
    quantize_text_encoder(other, bench.quant_config("int8"))
    leaked = {id(m): m for m in other.modules() if isinstance(m, QuantizedEmbedding)}  # the old benchmark's slip
    del other
    gc.collect()
    # every live tensor listed: in a full test session other tests' tensors can outrank the leaked table
    after = bench.device_tensors_outside(encoder, "cpu", top=None)
    table = next(iter(leaked.values())).parameter_bytes()
    assert after["bytes"] - before["bytes"] >= table
    assert any(entry["bytes"] == 1024 * 128 for entry in after["largest"])  # the int8 codes of the leaked table
