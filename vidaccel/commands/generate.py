"""`vidaccel generate PROMPT --preset NAME`: one accelerated video, compared with the dense one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt")
    parser.add_argument("--preset", default="dbcache",
                        help="preset name (see `vidaccel info`) or a preset JSON file")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="local diffusers model folder (default: the shipped reference model)")
    source.add_argument("--tiny", help="a tiny random-weight test pipeline kind (wan, hunyuan, cogvideox, ...)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cuda or cpu (default: best available)")
    parser.add_argument("--out", default="vidaccel_output.mp4", help="mp4 to write (accelerated video)")
    parser.add_argument("--no-compare", action="store_true", help="skip the dense baseline run")
    parser.add_argument("--json", help="also write the printed numbers to this JSON file")
    parser.add_argument("--warmup-steps", type=int, default=2,
                        help="an untimed short run of each pipeline first, so one-time setup is not timed")


def _overrides(args: argparse.Namespace) -> dict:
    names = {"steps": "num_inference_steps", "guidance": "guidance_scale", "height": "height", "width": "width",
             "frames": "num_frames"}
    return {target: getattr(args, source) for source, target in names.items() if getattr(args, source) is not None}


def run(args: argparse.Namespace) -> int:
    from ..metrics import compare_videos, json_safe
    from ..presets import resolve_preset
    from ..runner import accelerated, generate, load_pipeline, warm_up
    from ..video_io import write_mp4, write_side_by_side

    preset = resolve_preset(args.preset)  # fail on a bad preset before loading anything
    loaded = load_pipeline(args.model, tiny=args.tiny, device=args.device)
    overrides = _overrides(args)
    fps = 16
    result: dict = {"prompt": args.prompt, "preset": preset.name, "model": loaded.name, "seed": args.seed,
                    "call": {k: v for k, v in {**loaded.call_defaults, **overrides}.items()
                             if isinstance(v, (int, float, str))}}

    dense = None
    if not args.no_compare:
        print(f"[vidaccel] dense baseline ({loaded.name})")
        if args.warmup_steps > 0:
            warm_up(loaded, args.prompt, seed=args.seed, steps=args.warmup_steps, **overrides)
        dense = generate(loaded, args.prompt, seed=args.seed, **overrides)
        result["dense_seconds"] = dense.seconds
    print(f"[vidaccel] accelerated with preset {preset.name!r}")
    with accelerated(loaded.pipe, preset) as handle:
        if args.warmup_steps > 0:
            warm_up(loaded, args.prompt, seed=args.seed, steps=args.warmup_steps, **overrides)
        fast = generate(loaded, args.prompt, seed=args.seed, **overrides)
        result["stats"] = handle.stats()
    result["accelerated_seconds"] = fast.seconds

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(out, fast.video, fps=fps)
    result["video"] = str(out)
    lines = [f"accelerated  {fast.seconds:8.2f} s   -> {out}"]
    if dense is not None:
        quality = compare_videos(dense.video, fast.video)
        result.update(quality)
        side = out.with_name(out.stem + "_dense_vs_accelerated.mp4")
        write_side_by_side(side, dense.video, fast.video, fps=fps)
        result["comparison_video"] = str(side)
        lpips = f"{quality['lpips']:.4f}" if quality["lpips"] is not None else f"n/a ({quality['lpips_note']})"
        lines = [
            f"dense        {dense.seconds:8.2f} s",
            lines[0],
            f"speedup      {dense.seconds / fast.seconds:8.2f} x",
            f"PSNR         {quality['psnr']:8.2f} dB vs dense",
            f"SSIM         {quality['ssim']:8.4f}",
            f"LPIPS        {lpips}",
            f"side by side {side}",
        ]
    lines += _plan_lines(result["stats"], result["call"].get("num_inference_steps"))
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(result), indent=2, default=str))
    return 0


def _plan_lines(stats: dict, num_steps: int | None) -> list[str]:
    """The LeMiCa step plan of the timed run (not the warm-up's): steps computed and where the plan came from."""
    cache = stats.get("cache") or {}
    steps = cache.get("plan_steps", {}).get(str(num_steps))
    if steps is None:
        return []
    source = cache.get("plan_sources", {}).get(str(num_steps), "")
    return [f"LeMiCa plan  {len(steps)} of {num_steps} steps computed" + (f" ({source})" if source else "")]

