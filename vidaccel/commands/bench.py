"""`vidaccel bench`: dense vs presets over prompts and seeds — wall time, speedup, what each method did, peak
memory and quality vs dense. Writes JSON, a markdown table and a speed-vs-quality plot."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

DEFAULT_PROMPTS = [
    "a red circle moves left over a blue background",
    "a yellow square bounces over a green background",
    "a white triangle rotates over a black background",
    "a blue circle grows over an orange background",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="dense", help="comma-separated preset names or preset JSON files")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="local diffusers model folder (default: the shipped reference model)")
    source.add_argument("--tiny", help="tiny random-weight test pipeline kind")
    source.add_argument("--arch", help="full-size random-weight architecture for GPU speed runs (wan-1.3b, wan-14b)")
    parser.add_argument("--prompts", help="text file with one prompt per line (default: a built-in set)")
    parser.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, help="denoising steps")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--device")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed warm-up run per config")
    parser.add_argument("--out", default="bench_results", help="output folder")


def _prompts(args) -> list[str]:
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    return prompts[: args.num_prompts] if args.num_prompts else prompts


def _method_summary(stats: dict) -> dict:
    """The few numbers a table wants from a handle's stats."""
    summary = {}
    for role in ("attention", "cache"):
        part = stats.get(role) or {}
        for key in ("density", "mean_density", "computed_steps", "cached_steps"):
            if key in part:
                summary[f"{role}.{key}"] = part[key]
    return summary


def run(args: argparse.Namespace) -> int:
    from ..metrics import compare_videos, json_safe, relative_l1
    from ..presets import resolve_preset
    from ..runner import accelerated, generate, load_pipeline, warm_up

    presets = [resolve_preset(name.strip()) for name in args.presets.split(",") if name.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    prompts = _prompts(args)
    loaded = load_pipeline(args.model, tiny=args.tiny, arch=args.arch, device=args.device)
    overrides = {k: v for k, v in {"num_inference_steps": args.steps, "height": args.height, "width": args.width,
                                   "num_frames": args.frames}.items() if v is not None}
    latent_only = loaded.call_defaults.get("output_type") == "latent"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def run_all(label: str) -> list:
        if args.warmup_steps > 0:
            warm_up(loaded, prompts[0], seed=seeds[0], steps=args.warmup_steps, **overrides)
        results = []
        for prompt in prompts:
            for seed in seeds:
                print(f"[bench] {label}: seed {seed}: {prompt}")
                results.append(generate(loaded, prompt, seed=seed, progress=False, **overrides))
        return results

    dense_runs = run_all("dense (stock pipeline)")
    records = []
    for preset in presets:
        with accelerated(loaded.pipe, preset) as handle:
            runs = run_all(preset.name)
            stats = handle.stats()
        per_run = []
        for dense, fast in zip(dense_runs, runs):
            if latent_only:
                quality = {"latent_relative_l1": relative_l1(dense.video.float(), fast.video.float())}
            else:
                quality = compare_videos(dense.video, fast.video)
            per_run.append({"dense_seconds": dense.seconds, "seconds": fast.seconds,
                            "peak_memory_bytes": fast.peak_memory_bytes, **quality})
        dense_mean = statistics.mean(r["dense_seconds"] for r in per_run)
        mean = statistics.mean(r["seconds"] for r in per_run)
        record = {
            "preset": preset.name, "config": preset.to_dict(), "runs": per_run,
            "dense_seconds": dense_mean, "seconds": mean, "speedup": dense_mean / mean,
            "peak_memory_bytes": max((r["peak_memory_bytes"] or 0) for r in per_run) or None,
            **_method_summary(stats), "stats": stats,
        }
        for metric in ("psnr", "ssim", "lpips", "latent_relative_l1"):
            values = [r[metric] for r in per_run if r.get(metric) is not None]
            record[metric] = statistics.mean(values) if values else None
        records.append(record)

    meta = {"date": datetime.date.today().isoformat(), "model": loaded.name, "device": _device_name(),
            "python": platform.python_version(), "prompts": prompts, "seeds": seeds,
            "call": {k: v for k, v in {**loaded.call_defaults, **overrides}.items() if isinstance(v, (int, float, str))},
            "note": ("random weights: speed only, quality columns are not meaningful" if latent_only else
                     "quality vs the dense run of the same seed")}
    (out / "results.json").write_text(json.dumps(json_safe({"meta": meta, "records": records}), indent=2,
                                                 default=str))
    table = _markdown(meta, records)
    (out / "results.md").write_text(table)
    _plot(records, out / "speed_vs_quality.png", latent_only)
    print(table)
    return 0


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86'})"


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _markdown(meta: dict, records: list) -> str:
    lines = [f"{meta['date']} · {meta['device']} · model {meta['model']} · {meta['note']}", "",
             "| preset | dense s | preset s | speedup | PSNR dB | SSIM | LPIPS | peak GiB | details |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        details = ", ".join(f"{k}={v}" for k, v in r.items() if k.startswith(("attention.", "cache.")))
        peak = r["peak_memory_bytes"] / 2**30 if r["peak_memory_bytes"] else None
        lines.append(f"| {r['preset']} | {r['dense_seconds']:.2f} | {r['seconds']:.2f} | {r['speedup']:.2f}x | "
                     f"{_fmt(r['psnr'], '.2f')} | {_fmt(r['ssim'], '.4f')} | {_fmt(r['lpips'], '.4f')} | "
                     f"{_fmt(peak, '.1f')} | {details} |")
    return "\n".join(lines) + "\n"


def _plot(records: list, path: Path, latent_only: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        quality = r["latent_relative_l1"] if latent_only else r["psnr"]
        if quality is None or quality == float("inf"):
            quality = 0.0 if latent_only else 60.0  # identical to dense: draw at the top of the axis
        ax.scatter(r["speedup"], quality)
        ax.annotate(r["preset"], (r["speedup"], quality), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("speedup vs dense (x)")
    ax.set_ylabel("latent relative L1 vs dense" if latent_only else "PSNR vs dense (dB; identical drawn at 60)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
