"""`vidaccel plan`: measure a pipeline's LeMiCa segment errors and write one step plan per budget.

    vidaccel plan --model ./Wan2.1-T2V-1.3B-Diffusers --steps 50 --budgets 10,15,20 --out plans/
    vidaccel plan --tiny wan --steps 6 --budgets 3,4 --max-skip 2 --out /tmp/plans

Segment errors are checkpointed after each segment; rerun with ``--resume`` to continue an interrupted run. A
finished checkpoint is solved again for new budgets without generating (wherever it was measured).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

# How many captions of the reference model's training distribution plan it when no prompt file is given.
_REFERENCE_PROMPTS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local diffusers model folder")
    source.add_argument("--reference", action="store_true", help="the shipped reference model")
    source.add_argument("--tiny", help="a tiny random-weight test pipeline kind (wan, hunyuan, cogvideox, ...)")
    parser.add_argument("--steps", type=int, required=True, help="number of denoising steps the plans are for")
    parser.add_argument("--budgets", required=True, type=_int_list,
                        help="comma-separated numbers of computed steps, one plan each (e.g. 10,15,20)")
    parser.add_argument("--max-skip", type=int,
                        help="most consecutive reused steps in a segment (default: ceil(steps / smallest budget) + 1); "
                             "cost grows with it")
    parser.add_argument("--prompts", help="JSON prompt file: a list of strings or {\"prompts\": [...]} (default: the "
                                          "shipped planning prompts; for --reference, captions of its training set)")
    parser.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt k uses seed + k")
    parser.add_argument("--metric", default="relative_l1", help="segment error: relative_l1 (final latent, default), "
                                                                 "mean_l1 (final latent) or video_mse (decoded)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument("--device", help="cuda or cpu (default: best available)")
    parser.add_argument("--out", required=True, help="folder for the plan files")
    parser.add_argument("--checkpoint",
                        help="segment-error checkpoint (default: OUT/lemica-edges-<steps>steps.json)")
    parser.add_argument("--trajectory-dir", help="keep the dense trajectories here (safetensors) for resumed runs")
    parser.add_argument("--resume", action="store_true", help="continue from an existing checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one budget")
    return values


def _error(message: str) -> int:
    print(f"vidaccel plan: error: {message}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace):
    from ..runner import load_pipeline

    if args.reference:
        try:
            from ..reference import GENERATION_DEFAULTS, reference_pipeline  # noqa: F401
        except ImportError as error:
            raise RuntimeError(
                f"the reference model is not available in this vidaccel ({error}); use --model PATH or --tiny KIND"
            ) from None
    return load_pipeline(None if args.reference else args.model, tiny=args.tiny, device=args.device)


def _prompts(args: argparse.Namespace) -> list[str]:
    from ..offline_planner.trajectories import load_prompts

    if args.prompts is None and args.reference:
        try:
            from ..reference.data import sample_scenes
        except ImportError as error:
            raise RuntimeError(f"the reference model's captions are not available ({error}); pass --prompts") from None

        count = args.num_prompts or _REFERENCE_PROMPTS
        return [scene.caption for scene in sample_scenes(count, seed=args.seed)]
    prompts = load_prompts(args.prompts)
    return prompts[: args.num_prompts] if args.num_prompts else prompts


def run(args: argparse.Namespace) -> int:
    from ..offline_planner.measure import ERROR_METRICS, CheckpointMismatchError, candidate_edges
    from ..offline_planner.planner import check_budgets, make_plans, summary_table
    from ..offline_planner.trajectories import PLANNER_CALL_ARGUMENTS

    steps = args.steps
    if steps < 1:
        return _error(f"--steps must be positive, got {steps}")
    if args.metric not in ERROR_METRICS:
        return _error(f"--metric must be one of {', '.join(ERROR_METRICS)}, got {args.metric!r}")
    if args.num_prompts is not None and args.num_prompts < 1:
        return _error(f"--num-prompts must be positive, got {args.num_prompts}")
    max_skip = args.max_skip if args.max_skip is not None else math.ceil(steps / min(args.budgets)) + 1
    try:
        budgets = check_budgets(steps, args.budgets, max_skip)
        prompts = _prompts(args)
    except (ValueError, OSError, RuntimeError) as error:
        return _error(str(error))
    checkpoint = args.checkpoint or os.path.join(args.out, f"lemica-edges-{steps}steps.json")
    if os.path.exists(checkpoint) and not args.resume:
        return _error(f"{checkpoint} exists: pass --resume to continue it, or remove it to start over")

    try:
        loaded = _load(args)
    except RuntimeError as error:
        return _error(str(error))
    overrides = {"height": args.height, "width": args.width, "num_frames": args.frames,
                 "guidance_scale": args.guidance}
    call_kwargs = {key: value for key, value in loaded.call_defaults.items() if key not in PLANNER_CALL_ARGUMENTS}
    call_kwargs.update({key: value for key, value in overrides.items() if value is not None})

    segments = len(candidate_edges(steps, max_skip))
    print(f"[vidaccel plan] {loaded.name}: {steps} steps, budgets {budgets}, max skip {max_skip}, "
          f"{len(prompts)} prompts, {segments} segments to measure (checkpoint {checkpoint})")
    started = time.perf_counter()
    try:
        planned = make_plans(
            loaded.pipe, prompts, steps, budgets, max_skip, call_kwargs, args.out, checkpoint,
            seed=args.seed, metric=args.metric, trajectory_dir=args.trajectory_dir, progress=not args.quiet,
        )
    except CheckpointMismatchError as error:
        return _error(str(error))
    seconds = time.perf_counter() - started
    print(summary_table(planned))
    print(f"[vidaccel plan] {len(planned)} plan(s) in {args.out} ({seconds:.1f} s; error metric {args.metric})")
    return 0
