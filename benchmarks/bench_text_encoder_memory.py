"""GPU memory and encode latency of a full-size UMT5-XXL text encoder (random weights), bf16 vs low precision.

Issue "Low-precision text encoder" sets the targets for the encoder's GPU memory on an H100: bf16 11.4 GB,
int8 <= 6.2 GB, int4 <= 3.5 GB. UMT5-XXL's token table (256,384 x 4,096, 2.1 GB in bf16) must be packed too to
get there, so every quantized row runs with ``quantize_embeddings=True``; ``keep_originals_on_cpu=False`` drops
the bf16 layers, as a memory-bound deployment would.

Each row builds a fresh encoder directly on the GPU in bf16 (the default dtype and device are set while
constructing, so the 5.7 B parameters never exist in fp32), measures ``torch.cuda.memory_allocated`` of the
encoder, quantizes it in place, measures again, then times ``encoder(input_ids)`` for one prompt of 512 tokens
(median of 5 after warm-up). The quantized layers dequantize their weights on every call, so they trade speed
for memory; the speedup column says by how much. ``cosine_vs_bf16`` (per-token cosine of the output against the
bf16 encoder's) is a sanity check only: random weights say nothing about real fidelity, see
``text_encoder_fidelity.py`` and ``vidaccel text-encoder-eval`` for that.

    python benchmarks/bench_text_encoder_memory.py [--out FILE] [--methods int8,int4,int4-sinq]
    python benchmarks/bench_text_encoder_memory.py --tiny      # tiny UMT5 on the CPU: a smoke test

Needs only torch, transformers and vidaccel.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from vidaccel.text_encoder.quantize import TextEncoderQuant, module_bytes, quantize_text_encoder
from vidaccel.text_encoder.quantized_embedding import QuantizedEmbedding

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BENCHMARK = "text_encoder_memory"

UMT5_XXL = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
)
# Same structure, small enough for a CPU smoke test; widths are multiples of the int4 group size.
UMT5_TINY = dict(
    vocab_size=1024, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
)
# The targets for the full-size encoder, in bytes (decimal GB, as 5.7 B bf16 params = 11.4 GB).
TARGET_BYTES = {"int8": 6.2e9, "int4": 3.5e9, "int4-sinq": 3.5e9}

DEFAULT_METHODS = ("int8", "int4", "int4-sinq")
BATCH, TOKENS, TINY_TOKENS = 1, 512, 64  # bf16 matmuls are slow on CPUs: the smoke test encodes fewer tokens
WARMUP, REPEATS = 2, 5


def quant_config(method: str) -> TextEncoderQuant:
    return TextEncoderQuant(method=method, group_size=64, quantize_embeddings=True, keep_originals_on_cpu=False)


def build_encoder(config_kwargs: dict, device: str):
    """A randomly initialised ``UMT5EncoderModel`` created on ``device`` directly in bf16."""
    import transformers

    config = transformers.UMT5Config(dropout_rate=0.0, **config_kwargs)
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            encoder = transformers.UMT5EncoderModel(config)
    finally:
        torch.set_default_dtype(previous)
    if next(encoder.parameters()).dtype != torch.bfloat16:
        raise RuntimeError("the encoder was not built in bf16")
    return encoder.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else 0


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


@torch.inference_mode()
def encode_ms(encoder, input_ids: torch.Tensor, device: str) -> tuple[float, torch.Tensor]:
    """Median wall time of one encode (ms) and the last output."""
    for _ in range(WARMUP):
        out = encoder(input_ids=input_ids).last_hidden_state
    times = []
    for _ in range(REPEATS):
        sync(device)
        start = time.perf_counter()
        out = encoder(input_ids=input_ids).last_hidden_state
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out.float().cpu()


def peak_encode_bytes(encoder, input_ids: torch.Tensor, device: str, resident: int) -> int | None:
    """Extra GPU memory one encode needs above the resident encoder (activations, dequantized weights)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        encoder(input_ids=input_ids)
    sync(device)
    return torch.cuda.max_memory_allocated() - resident


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def run(methods: list[str], tiny: bool, device: str) -> list[dict]:
    config_kwargs = UMT5_TINY if tiny else UMT5_XXL
    device_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    tokens = TINY_TOKENS if tiny else TOKENS
    ids_generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config_kwargs["vocab_size"], (BATCH, tokens), generator=ids_generator).to(device)
    release(device)
    start_bytes = allocated(device)

    def record(method: str, **fields) -> dict:
        return {"benchmark": BENCHMARK, "method": method, "date": date, "device": device_name, "shape": shape,
                **fields}

    encoder = build_encoder(config_kwargs, device)
    params = sum(p.numel() for p in encoder.parameters())
    shape = {"name": "umt5-tiny" if tiny else "umt5-xxl", **config_kwargs, "params": params, "batch": BATCH,
             "tokens": tokens, "dtype": "bfloat16"}
    # On the GPU the allocator's count is the measurement; on the CPU (smoke test) the tensors' own bytes.
    baseline_bytes = allocated(device) - start_bytes if device.startswith("cuda") else module_bytes(encoder)
    baseline_ms, reference = encode_ms(encoder, input_ids, device)
    records = [record(
        "bf16", bytes=baseline_bytes, module_bytes=module_bytes(encoder), baseline_bytes=baseline_bytes,
        memory_ratio=1.0, target_bytes=None, meets_target=None, baseline_ms=round(baseline_ms, 3),
        method_ms=round(baseline_ms, 3), speedup=1.0, quantize_s=0.0,
        encode_peak_extra_bytes=peak_encode_bytes(encoder, input_ids, device, allocated(device)),
        cosine_vs_bf16=1.0,
    )]
    _print_row(records[-1])
    del encoder
    release(device)

    for method in methods:
        encoder = build_encoder(config_kwargs, device)
        config = quant_config(method)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        started = time.perf_counter()
        result = quantize_text_encoder(encoder, config)
        sync(device)
        quantize_s = time.perf_counter() - started
        quantize_peak = torch.cuda.max_memory_allocated() - start_bytes if device.startswith("cuda") else None
        release(device)
        resident = allocated(device)
        after_bytes = resident - start_bytes if device.startswith("cuda") else module_bytes(encoder)
        tables = {id(m): m for m in encoder.modules() if isinstance(m, QuantizedEmbedding)}  # tied: count once
        embedding_bytes = sum(m.parameter_bytes() for m in tables.values())
        method_ms, out = encode_ms(encoder, input_ids, device)
        target = None if tiny else TARGET_BYTES.get(method)
        records.append(record(
            method, bytes=after_bytes, module_bytes=module_bytes(encoder), baseline_bytes=baseline_bytes,
            memory_ratio=round(after_bytes / baseline_bytes, 4), target_bytes=target,
            meets_target=None if target is None else after_bytes <= target,
            baseline_ms=round(baseline_ms, 3), method_ms=round(method_ms, 3),
            speedup=round(baseline_ms / method_ms, 4), quantize_s=round(quantize_s, 3),
            quantize_peak_bytes=quantize_peak,
            encode_peak_extra_bytes=peak_encode_bytes(encoder, input_ids, device, resident),
            embedding_bytes=embedding_bytes, quantized_linear_layers=len(result.quantized_modules),
            quantized_embeddings=result.quantized_embeddings, skipped_embeddings=sorted(result.skipped_embeddings),
            cosine_vs_bf16=round(mean_cosine(out, reference), 6), config=dataclasses.asdict(config),
        ))
        _print_row(records[-1])
        del encoder, result
        release(device)
    return records


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.3f}"


def _print_row(rec: dict) -> None:
    unit = 1e9 if rec["shape"]["name"] == "umt5-xxl" else 1e6
    print(f"{rec['method']:>10}: {rec['bytes'] / unit:.3f} {'GB' if unit == 1e9 else 'MB'}, "
          f"{rec['method_ms']:.2f} ms, quantize {rec['quantize_s']:.2f} s", flush=True)


def markdown_table(records: list[dict]) -> str:
    unit, label = (1e9, "GB") if records[0]["shape"]["name"] == "umt5-xxl" else (1e6, "MB")
    shape = records[0]["shape"]
    lines = [
        f"{shape['name']} ({shape['params']:,} params, random weights), {records[0]['device']}, "
        f"encode {shape['batch']} x {shape['tokens']} tokens, median of {REPEATS}",
        "",
        f"| weights | memory ({label}) | vs bf16 | target ({label}) | meets | encode ms | speedup | quantize s |",
        "|---|---:|---:|---:|:-:|---:|---:|---:|",
    ]
    for rec in records:
        target = "-" if rec["target_bytes"] is None else f"{rec['target_bytes'] / unit:.2f}"
        meets = {None: "-", True: "yes", False: "NO"}[rec["meets_target"]]
        lines.append(
            f"| {rec['method']} | {rec['bytes'] / unit:.3f} | {rec['memory_ratio']:.3f} | {target} | {meets} | "
            f"{rec['method_ms']:.2f} | {rec['speedup']:.3f} | {rec['quantize_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON records (default {RESULTS_DIR}/{BENCHMARK}[_tiny].json)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated linear methods to compare with bf16 (embeddings follow: int8 or int4)")
    parser.add_argument("--tiny", action="store_true", help="tiny UMT5 on the CPU (smoke test)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        quant_config(method)  # unknown names fail here, before minutes of building
    if args.tiny:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        parser.error("the full-size run needs a CUDA GPU (use --tiny for the CPU smoke test)")
    records = run(methods, args.tiny, device)
    out = args.out or RESULTS_DIR / f"{BENCHMARK}{'_tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    print(markdown_table(records))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
