"""`vidaccel tune --min-psnr 28 --out preset.json`: search a small grid of method settings on a pipeline and write
the fastest preset that keeps the quality floor (vs the stock pipeline, same prompts and seeds) to a preset file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .bench import DEFAULT_PROMPTS


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="local diffusers model folder (default: the shipped reference model)")
    source.add_argument("--tiny", help="tiny random-weight test pipeline kind (wan, wan2.2, hunyuan, cogvideox...)")
    parser.add_argument("--prompts", help="prompt file: one prompt per line, or JSON (a list or {\"prompts\": [...]}) "
                                          "(default: the built-in set of `vidaccel bench`)")
    parser.add_argument("--num-prompts", type=int, default=2, help="use only the first N prompts (default 2)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--min-psnr", type=float, default=28.0, help="quality floor: PSNR vs stock, every prompt")
    parser.add_argument("--min-ssim", type=float, help="optional second floor: SSIM vs stock, every prompt")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--device")
    parser.add_argument("--radial-warmups", default="0.25,0.15",
                        help="Radial dense warm-up fractions to try (empty: no Radial)")
    parser.add_argument("--radial-block-size", type=int, default=128, choices=(64, 128))
    parser.add_argument("--dbcache-thresholds", default="0.08,0.15", help="DBCache thresholds to try (empty: none)")
    parser.add_argument("--dbcache-warmup", type=float, default=0.2, help="DBCache warm-up, fraction of the steps")
    parser.add_argument("--lemica-budgets", default="0.5",
                        help="LeMiCa: fractions of the steps to compute, evenly spaced plans (empty: none)")
    parser.add_argument("--lemica-plans", default="", help="comma-separated LeMiCa plan files to try too")
    parser.add_argument("--text-encoders", default="none,int8",
                        help="text-encoder choices: none (stock) and/or formats such as int8")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed warm-up runs")
    parser.add_argument("--name", default="tuned", help="name stored in the preset file")
    parser.add_argument("--out", default="vidaccel_tuned.json", help="preset JSON file to write")


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        path = Path(args.prompts)
        if path.suffix.lower() == ".json":
            from ..offline_planner.trajectories import load_prompts

            prompts = load_prompts(path)
        else:
            prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return list(prompts[: args.num_prompts] if args.num_prompts else prompts)


def run(args: argparse.Namespace) -> int:
    from ..runner import load_pipeline
    from ..tune import QualityFloor, TuneError, TuneGrid, tune, write_tuned_preset

    grid = TuneGrid(
        radial_warmups=_floats(args.radial_warmups), radial_block_size=args.radial_block_size,
        dbcache_thresholds=_floats(args.dbcache_thresholds), dbcache_warmup=args.dbcache_warmup,
        lemica_budgets=_floats(args.lemica_budgets),
        lemica_plans=tuple(p.strip() for p in args.lemica_plans.split(",") if p.strip()),
        text_encoders=tuple(None if t.strip().lower() in ("none", "stock") else t.strip()
                            for t in args.text_encoders.split(",") if t.strip()),
    )
    floor = QualityFloor(args.min_psnr, args.min_ssim)
    prompts = _prompts(args)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    loaded = load_pipeline(args.model, tiny=args.tiny, device=args.device)
    overrides = {k: v for k, v in {"num_inference_steps": args.steps, "height": args.height, "width": args.width,
                                   "num_frames": args.frames}.items() if v is not None}
    if "num_inference_steps" not in {**loaded.call_defaults, **overrides}:
        overrides["num_inference_steps"] = 50
    try:
        result = tune(loaded, prompts, floor=floor, grid=grid, seeds=seeds, overrides=overrides,
                      warmup_steps=args.warmup_steps)
    except TuneError as error:
        print(f"vidaccel tune: {error}", file=sys.stderr)
        return 1
    path = write_tuned_preset(result, args.out, name=args.name)
    best = result.best
    print(f"\nchosen: {best.name}: {best.speedup:.2f}x, PSNR min {best.psnr_min:.2f} dB, SSIM min "
          f"{best.ssim_min:.4f} ({floor.describe()}) -> {path}\n"
          f"use it: vidaccel.apply(pipe, {str(path)!r})")
    return 0
