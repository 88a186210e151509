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

Accounting. Every row also reports the encoder's own tensors by component (packed codes, group scales, zero
points, SINQ column scales, packed token table, norms, relative-position biases, any float weight left), the bytes
predicted from the formats' packed sizes alone (``predicted_module_bytes``), ``unaccounted_bytes`` (allocator count
minus the encoder's tensors: block rounding, ~10-20 MB) and the live GPU tensors the encoder does not own. The
first H100 run (2026-11-27) measured int4 4.30 GB and int4-sinq 3.84 GB while the encoder held 3.196 / 3.199 GB:
the loop kept the previous row's packed token table alive (int8's 1.05 GB, then int4's 0.59 GB) and counted the
32 MiB cuBLAS workspace. Both are fixed here (a row is measured inside its own function; workspaces are cleared).

    python benchmarks/bench_text_encoder_memory.py [--out FILE] [--methods int8,int4,int4-sinq]
    python benchmarks/bench_text_encoder_memory.py --tiny      # tiny UMT5 on the CPU: a smoke test (--smoke too)
    python benchmarks/bench_text_encoder_memory.py --cpu --layers 1   # full width, one block, on the CPU

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
import warnings
from pathlib import Path

import torch

from vidaccel.text_encoder.quantize import TextEncoderQuant, module_bytes, quantize_text_encoder
from vidaccel.text_encoder.formats import packed_nbytes
from vidaccel.text_encoder.quantized_embedding import QuantizedEmbedding
from vidaccel.text_encoder.quantized_linear import SINQ_METHODS, QuantizedLinear, storage_format

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
TARGET_BYTES = {"int8": 6.2e9, "int8-sinq": 6.2e9, "int4": 3.5e9, "int4-sinq": 3.5e9}

DEFAULT_METHODS = ("int8", "int8-sinq", "int4", "int4-sinq")
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
        # cuBLAS keeps a workspace (32 MiB on Hopper) in the caching allocator after the first matmul; without
        # clearing it, every row measured after the first encode would count it as encoder memory.
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()


def _category(module: torch.nn.Module, module_name: str, tensor_name: str) -> str:
    """Which component a parameter/buffer belongs to (keys of :func:`component_bytes`)."""
    if isinstance(module, QuantizedLinear):
        kind = "bias" if tensor_name == "bias" else "col_scale" if tensor_name == "col_scale" else "packed"
        return f"linear.{kind}.{tensor_name}" if kind == "packed" else f"linear.{kind}"
    if isinstance(module, QuantizedEmbedding):
        return f"embedding.packed.{tensor_name}"
    if isinstance(module, torch.nn.Linear):
        return "linear.float_weight" if tensor_name == "weight" else "linear.bias"
    if isinstance(module, torch.nn.Embedding):
        return "relative_attention_bias" if "relative_attention_bias" in module_name else "embedding.float_table"
    if "norm" in type(module).__name__.lower() or "norm" in module_name.lower():
        return "norm"
    return f"other.{type(module).__name__}.{tensor_name}"


def component_bytes(encoder: torch.nn.Module) -> dict[str, dict]:
    """Bytes of the encoder's distinct tensors by component, with their dtypes and count (tied tensors once).

    The sum over components equals ``module_bytes(encoder)``; on the GPU the difference to the allocator's count
    is ``unaccounted_bytes`` (allocator block rounding, and any tensor held outside the encoder).
    """
    seen: set[int] = set()
    out: dict[str, dict] = {}
    for module_name, module in encoder.named_modules(remove_duplicate=False):
        for tensor_name, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
            if tensor is None or id(tensor) in seen or tensor.numel() == 0:  # skip zero-size dtype markers
                continue
            seen.add(id(tensor))
            entry = out.setdefault(_category(module, module_name, tensor_name), {"bytes": 0, "tensors": 0, "dtypes": []})
            entry["bytes"] += tensor.numel() * tensor.element_size()
            entry["tensors"] += 1
            if str(tensor.dtype) not in entry["dtypes"]:
                entry["dtypes"].append(str(tensor.dtype))
    return dict(sorted(out.items()))


def device_tensors_outside(encoder: torch.nn.Module, device: str, top: int | None = 5) -> dict:
    """Live tensors on ``device`` whose storage the encoder does not own (leaks show up here), by total bytes, with
    the ``top`` largest listed (None: all)."""
    owned = {t.untyped_storage().data_ptr() for t in (*encoder.parameters(), *encoder.buffers()) if t is not None}
    storages: dict[int, tuple[int, tuple, str]] = {}
    kind = torch.device(device).type
    with warnings.catch_warnings():  # isinstance() on deprecated module proxies warns; they are not tensors
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.Tensor) or obj.device.type != kind:
                    continue
                storage = obj.untyped_storage()
            except Exception:  # some objects raise on attribute access; they are not our tensors
                continue
            if storage.data_ptr() not in owned:
                storages[storage.data_ptr()] = (storage.nbytes(), tuple(obj.shape), str(obj.dtype))
    largest = sorted(storages.values(), reverse=True)[:top]
    return {"bytes": sum(v[0] for v in storages.values()), "count": len(storages),
            "largest": [{"bytes": b, "shape": list(sh), "dtype": dt} for b, sh, dt in largest]}


def predicted_module_bytes(config_kwargs: dict, config: TextEncoderQuant | None) -> int:
    """Bytes a UMT5 encoder of this shape must hold: bf16 (``config`` None) or quantized by ``config``, from the
    formats' packed sizes alone (no tensors). Linear layers per block: q, k, v, o and gated-gelu wi_0, wi_1, wo;
    norms, per-block relative-position biases and (unless packed) the token table stay bf16."""
    d, inner = config_kwargs["d_model"], config_kwargs["num_heads"] * config_kwargs["d_kv"]
    d_ff, layers, vocab = config_kwargs["d_ff"], config_kwargs["num_layers"], config_kwargs["vocab_size"]
    shapes = [(inner, d)] * 3 + [(d, inner)] + [(d_ff, d)] * 2 + [(d, d_ff)]  # (out, in)
    bf16 = 2
    norms = (2 * layers + 1) * d * bf16
    rel_bias = layers * config_kwargs["relative_attention_num_buckets"] * config_kwargs["num_heads"] * bf16
    if config is None:
        return layers * sum(o * i for o, i in shapes) * bf16 + vocab * d * bf16 + norms + rel_bias
    fmt = storage_format(config.method)
    linear = sum(packed_nbytes(fmt, o, i, config.group_size) + (4 * i if config.method in SINQ_METHODS else 0)
                 for o, i in shapes)
    if config.quantize_embeddings:
        table = packed_nbytes(config.embedding_method, vocab, d, config.group_size)
    else:
        table = vocab * d * bf16
    return layers * linear + table + norms + rel_bias


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


def run(methods: list[str], tiny: bool, device: str, layers: int | None = None) -> list[dict]:
    config_kwargs = dict(UMT5_TINY if tiny else UMT5_XXL)
    if layers is not None:
        config_kwargs["num_layers"] = layers
    device_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    tokens = TINY_TOKENS if tiny or not device.startswith("cuda") else TOKENS
    ids_generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config_kwargs["vocab_size"], (BATCH, tokens), generator=ids_generator).to(device)
    release(device)
    start_bytes = allocated(device)
    name = "umt5-tiny" if tiny else "umt5-xxl"
    if layers is not None and layers != (UMT5_TINY if tiny else UMT5_XXL)["num_layers"]:
        name += f"-{layers}-layers"

    def record(method: str, **fields) -> dict:
        return {"benchmark": BENCHMARK, "method": method, "date": date, "device": device_name, "shape": shape,
                **fields}

    encoder = build_encoder(config_kwargs, device)
    params = sum(p.numel() for p in encoder.parameters())
    shape = {"name": name, **config_kwargs, "params": params, "batch": BATCH, "tokens": tokens, "dtype": "bfloat16"}
    # On the GPU the allocator's count is the measurement; on the CPU (smoke test) the tensors' own bytes.
    baseline_bytes = allocated(device) - start_bytes if device.startswith("cuda") else module_bytes(encoder)
    baseline_ms, reference = encode_ms(encoder, input_ids, device)
    records = [record(
        "bf16", bytes=baseline_bytes, module_bytes=module_bytes(encoder), baseline_bytes=baseline_bytes,
        predicted_module_bytes=predicted_module_bytes(config_kwargs, None),
        unaccounted_bytes=baseline_bytes - module_bytes(encoder), components=component_bytes(encoder),
        memory_ratio=1.0, target_bytes=None, meets_target=None, baseline_ms=round(baseline_ms, 3),
        method_ms=round(baseline_ms, 3), speedup=1.0, quantize_s=0.0,
        encode_peak_extra_bytes=peak_encode_bytes(encoder, input_ids, device, allocated(device)),
        cosine_vs_bf16=1.0,
    )]
    _print_row(records[-1])
    del encoder
    release(device)

    for method in methods:
        try:
            records.append(measure_method(
                method, config_kwargs, device, input_ids, start_bytes, baseline_bytes, baseline_ms, reference,
                tiny or layers is not None, record,
            ))
            _print_row(records[-1])
        except Exception as error:  # keep the other rows: record what failed and move on
            records.append(record(method, error=f"{type(error).__name__}: {error}"))
            print(f"{method:>10}: FAILED {records[-1]['error']}", flush=True)
        release(device)
    return records


def measure_method(method, config_kwargs, device, input_ids, start_bytes, baseline_bytes, baseline_ms, reference,
                   reduced, record) -> dict:
    """Quantize a fresh encoder with ``method`` and measure it; nothing of it survives this call."""
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
    held = module_bytes(encoder)
    after_bytes = resident - start_bytes if device.startswith("cuda") else held
    outside = device_tensors_outside(encoder, device) if device.startswith("cuda") else None
    components = component_bytes(encoder)
    embedding_bytes = sum(v["bytes"] for k, v in components.items() if k.startswith("embedding.packed"))
    method_ms, out = encode_ms(encoder, input_ids, device)
    target = None if reduced else TARGET_BYTES.get(method)
    rec = record(
        method, bytes=after_bytes, module_bytes=held, baseline_bytes=baseline_bytes,
        predicted_module_bytes=predicted_module_bytes(config_kwargs, config),
        unaccounted_bytes=after_bytes - held, tensors_outside_encoder=outside, components=components,
        memory_ratio=round(after_bytes / baseline_bytes, 4), target_bytes=target,
        meets_target=None if target is None else after_bytes <= target,
        baseline_ms=round(baseline_ms, 3), method_ms=round(method_ms, 3),
        speedup=round(baseline_ms / method_ms, 4), quantize_s=round(quantize_s, 3),
        quantize_peak_bytes=quantize_peak,
        encode_peak_extra_bytes=peak_encode_bytes(encoder, input_ids, device, resident),
        embedding_bytes=embedding_bytes, quantized_linear_layers=len(result.quantized_modules),
        quantized_embeddings=result.quantized_embeddings, skipped_embeddings=sorted(result.skipped_embeddings),
        cosine_vs_bf16=round(mean_cosine(out, reference), 6), config=dataclasses.asdict(config),
    )
    del encoder, result, out
    return rec


def _unit(records: list[dict]) -> tuple[float, str]:
    return (1e9, "GB") if records[0]["shape"]["name"].startswith("umt5-xxl") else (1e6, "MB")


def _print_row(rec: dict) -> None:
    unit, label = _unit([rec])
    print(f"{rec['method']:>10}: {rec['bytes'] / unit:.3f} {label} (tensors of the encoder "
          f"{rec['module_bytes'] / unit:.3f}, predicted {rec['predicted_module_bytes'] / unit:.3f}), "
          f"{rec['method_ms']:.2f} ms, quantize {rec['quantize_s']:.2f} s", flush=True)


def markdown_table(records: list[dict]) -> str:
    unit, label = _unit(records)
    shape = records[0]["shape"]
    lines = [
        f"{shape['name']} ({shape['params']:,} params, random weights), {records[0]['device']}, "
        f"encode {shape['batch']} x {shape['tokens']} tokens, median of {REPEATS}",
        "",
        f"| weights | memory ({label}) | encoder tensors ({label}) | predicted ({label}) | unaccounted ({label}) | "
        f"vs bf16 | target ({label}) | meets | encode ms | speedup | quantize s |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|---:|---:|---:|",
    ]
    for rec in records:
        if "error" in rec:
            lines.append(f"| {rec['method']} | failed: {rec['error'][:120]} |")
            continue
        target = "-" if rec["target_bytes"] is None else f"{rec['target_bytes'] / unit:.2f}"
        meets = {None: "-", True: "yes", False: "NO"}[rec["meets_target"]]
        lines.append(
            f"| {rec['method']} | {rec['bytes'] / unit:.3f} | {rec['module_bytes'] / unit:.3f} | "
            f"{rec['predicted_module_bytes'] / unit:.3f} | {rec['unaccounted_bytes'] / unit:.3f} | "
            f"{rec['memory_ratio']:.3f} | {target} | {meets} | {rec['method_ms']:.2f} | {rec['speedup']:.3f} | "
            f"{rec['quantize_s']:.2f} |"
        )
    lines += ["", f"Per-component bytes ({label}; dtypes):", ""]
    ok = [rec for rec in records if "error" not in rec]
    names = sorted({name for rec in ok for name in rec["components"]})
    lines.append("| component | " + " | ".join(rec["method"] for rec in ok) + " |")
    lines.append("|---|" + "---:|" * len(ok))
    for name in names:
        cells = []
        for rec in ok:
            entry = rec["components"].get(name)
            cells.append("-" if entry is None else f"{entry['bytes'] / unit:.4f} ({', '.join(d.replace('torch.', '') for d in entry['dtypes'])})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    outside = [rec for rec in ok if rec.get("tensors_outside_encoder")]
    if outside:
        lines += ["", "Live device tensors not owned by the encoder (after quantization): " + "; ".join(
            f"{rec['method']} {rec['tensors_outside_encoder']['bytes'] / unit:.4f} {label} in "
            f"{rec['tensors_outside_encoder']['count']} storages" for rec in outside)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON records (default {RESULTS_DIR}/{BENCHMARK}[_tiny].json)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated linear methods to compare with bf16 (embeddings follow: int8 or int4)")
    parser.add_argument("--tiny", "--smoke", dest="tiny", action="store_true",
                        help="tiny UMT5 on the CPU (smoke test)")
    parser.add_argument("--layers", type=int, default=None,
                        help="number of encoder blocks (default: the model's); with --cpu, full width on the CPU")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        quant_config(method)  # unknown names fail here, before minutes of building
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    if args.tiny or args.cpu:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        parser.error("the full-size run needs a CUDA GPU (use --tiny for the CPU smoke test, or --cpu --layers N)")
    if device == "cpu" and not args.tiny and args.layers is None:
        parser.error("a full-width CPU run needs --layers (one block is ~0.4 GB in bf16, plus the 2.1 GB table)")
    records = run(methods, args.tiny, device, args.layers)
    suffix = "_tiny" if args.tiny else f"_cpu_{args.layers}layers" if device == "cpu" else ""
    out = args.out or RESULTS_DIR / f"{BENCHMARK}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    print(markdown_table(records))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
