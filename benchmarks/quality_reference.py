#!/usr/bin/env python
"""Quality of every acceleration method against the dense run on the shipped reference model, same seeds.

For each configuration and each held-out caption: the decoded video's PSNR / SSIM against the dense video of the
same caption and seed, the work actually done (full transformer passes, counted as calls of the last transformer
block, so vidaccel's methods and the peers are counted the same way) and what the method reports (attention
density, computed/cached steps). Caching methods are compared at equal computed work: LeMiCa plans for several
budgets (``--plans-dir``), DBCache / FirstBlockCache / cache-dit thresholds swept.

    python benchmarks/quality_reference.py --out results/quality_reference.json --prompts 8 \
        --plans-dir assets/reference/lemica [--only lemica,dbcache] [--device cuda]

Configurations that cannot run here (cache-dit not installed, no plans) are recorded with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vidaccel
from vidaccel.metrics import json_safe, psnr, ssim
from vidaccel.presets import candidate_preset
from vidaccel.reference import data
from vidaccel.runner import LoadedPipeline, accelerated, generate, load_pipeline

# Candidates around the floors (25 / 28 / 32 dB) on the reference model v13. A first H100 run over 16 captions
# (LeMiCa alone, no int8 text encoder; results/preset_calibration_v13_2026-12-05.json) gave 16/18/20/22/25 of 50
# steps 24.9/26.3/28.0/29.8/31.9 dB; every budget here has a 50-step plan in assets/reference/lemica.
CALIBRATION_BUDGETS = (17, 18, 19, 21, 22, 26, 27, 28)
CALIBRATION_LATE_RADIAL = ((17, 0.5), (18, 0.5), (19, 0.5))
# int8 cost ~2 dB at every budget there (22 of 50: 28.1 with, 29.8 dB without): quality candidates without it.
CALIBRATION_FULL_TEXT_ENCODER = (26, 27)


@contextmanager
def vidaccel_preset(pipe, preset) -> Iterator[dict[str, Any]]:
    info: dict[str, Any] = {}
    with accelerated(pipe, preset) as handle:
        yield info
        stats = handle.stats()
        info["cache"] = {k: stats["cache"].get(k) for k in ("computed", "cached")} if "cache" in stats else None
        if "attention" in stats:
            attention = stats["attention"]
            info["attention"] = {k: attention.get(k) for k in ("density", "mean_density", "calls",
                                                                "sparse_fraction_of_calls") if k in attention}


@contextmanager
def first_block_cache(pipe, threshold: float) -> Iterator[dict[str, Any]]:
    from diffusers import FirstBlockCacheConfig

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        yield {}
    finally:
        pipe.transformer.disable_cache()


@contextmanager
def cache_dit_dbcache(pipe, threshold: float, steps: int) -> Iterator[dict[str, Any]]:
    import cache_dit
    from cache_dit import DBCacheConfig

    cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold, max_warmup_steps=8,
        num_inference_steps=steps, enable_separate_cfg=True))
    try:
        yield {"cache_dit": cache_dit.__version__}
    finally:
        cache_dit.disable_cache(pipe)


@contextmanager
def last_block_calls(pipe) -> Iterator[list[int]]:
    """Counts full transformer passes: every method here skips the last block when it reuses a step. The hook sits on
    the block's feed-forward, which only runs when the block computes (diffusers' cache hooks and ours replace the
    block's forward, so a hook on the block itself would fire for skipped calls too)."""
    count = [0]
    handle = pipe.transformer.blocks[-1].ffn.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


def configurations(args, steps: int) -> dict[str, Callable[[Any], Any]]:
    configs: dict[str, Callable[[Any], Any]] = {}
    wanted = set(args.only.split(",")) if args.only else None

    def add(family: str, name: str, make: Callable[[Any], Any]) -> None:
        if wanted is None or family in wanted:
            configs[name] = make

    plans = sorted(Path(args.plans_dir).glob(f"*{steps}steps*.json")) if args.plans_dir else []
    for plan in plans:
        add("lemica", f"lemica {plan.stem}", lambda pipe, p=plan: vidaccel_preset(
            pipe, vidaccel.Preset(cache=vidaccel.LeMiCa(plan=str(p)), name="lemica")))
    for threshold in (0.05, 0.1, 0.2, 0.3, 0.5):
        add("dbcache", f"vidaccel DBCache F1B0 t={threshold}", lambda pipe, t=threshold: vidaccel_preset(
            pipe, vidaccel.Preset(cache=vidaccel.DBCache(Fn=1, Bn=0, threshold=t, warmup_steps=8), name="dbcache")))
    for threshold in (0.05, 0.1, 0.2, 0.3, 0.5):
        add("fbcache", f"diffusers FirstBlockCache t={threshold}", lambda pipe, t=threshold: first_block_cache(pipe, t))
    for threshold in (0.05, 0.1, 0.2, 0.3, 0.5):
        add("cache-dit", f"cache-dit DBCache F1B0 t={threshold}",
            lambda pipe, t=threshold: cache_dit_dbcache(pipe, t, steps))
    for warmup in (0.25, 0.0):
        add("radial", f"radial warmup {warmup}", lambda pipe, w=warmup: vidaccel_preset(
            pipe, vidaccel.Preset(attention=vidaccel.RadialAttention(dense_warmup=w), name="radial")))
    # Issue #6 asks >= 30 dB of Radial on this model; at the authors' settings its mask here is the authors' own,
    # block for block (tests/test_radial_layout.py). What do the authors' other knobs buy?
    for label, knobs in (("warmup 0.25", {}), ("warmup 0.35", {"dense_warmup": 0.35}),
                         ("warmup 0.5", {"dense_warmup": 0.5}), ("dense layers 2", {"dense_layers": 2}),
                         ("64-token blocks", {"block_size": 64})):
        add("radial-knobs", f"radial {label}", lambda pipe, kw=knobs: vidaccel_preset(
            pipe, vidaccel.Preset(attention=vidaccel.RadialAttention(**kw), name="radial")))
    svg2 = getattr(vidaccel, "SVG2Attention", None)
    if svg2 is not None:
        for top_p in (0.95, 0.9, 0.8):
            add("svg2", f"svg2 top_p {top_p}", lambda pipe, p=top_p: vidaccel_preset(
                pipe, vidaccel.Preset(attention=svg2(top_p=p), name="svg2")))
    # SVG2's warm k-means iterations are most of its overhead at Wan 480p: what does one fewer cost in quality?
    if svg2 is not None:
        for iterations in (2, 1):
            add("svg2-iterations", f"svg2 top_p 0.9 warm iterations {iterations}", lambda pipe, i=iterations:
                vidaccel_preset(pipe, vidaccel.Preset(attention=svg2(top_p=0.9, warm_iterations=i), name="svg2")))
    # Issue #7 asks SVG2 to beat Radial at equal density. On this 2,304-token model Radial keeps 0.877 of the pairs
    # with the authors' settings and 0.667 with 64-token blocks, no near frames and no sink; SVG2 is held at those
    # densities by its floor on kept key clusters. Both with the same 25% dense warm-up and first layer dense.
    if svg2 is not None:
        add("equal-density", "radial 64-blocks near 0 no sink (0.667)", lambda pipe: vidaccel_preset(
            pipe, vidaccel.Preset(attention=vidaccel.RadialAttention(block_size=64, dense_near_frames=0,
                                                                     attention_sink=False), name="radial")))
        for floor in (0.667, 0.877):
            add("equal-density", f"svg2 top_p 0.9 min kept {floor}", lambda pipe, f=floor: vidaccel_preset(
                pipe, vidaccel.Preset(attention=svg2(top_p=0.9, min_kept_fraction=f, dense_warmup=0.25),
                                      name="svg2")))
        add("equal-density", "radial warmup 0.25", lambda pipe: vidaccel_preset(
            pipe, vidaccel.Preset(attention=vidaccel.RadialAttention(dense_warmup=0.25), name="radial")))
    # Candidates for the combined presets, each built exactly as a preset would be (LeMiCa plan + int8 text
    # encoder): a plan alone, and with Radial on the computed steps after a dense warm-up.
    for budget in CALIBRATION_BUDGETS:
        add("calibration", f"candidate {budget}/50", lambda pipe, b=budget: vidaccel_preset(pipe, candidate_preset(b)))
    for budget in CALIBRATION_FULL_TEXT_ENCODER:
        add("calibration-fp", f"candidate {budget}/50, text encoder as loaded",
            lambda pipe, b=budget: vidaccel_preset(pipe, candidate_preset(b, int8_text_encoder=False)))
    for budget, warmup in CALIBRATION_LATE_RADIAL:
        add("calibration-late", f"candidate {budget}/50 + radial after {warmup}",
            lambda pipe, b=budget, w=warmup: vidaccel_preset(pipe, candidate_preset(b, w)))
    for preset in ("quality", "balanced", "fast"):
        if preset in vidaccel.list_presets():
            add("presets", f"preset {preset}", lambda pipe, p=preset: vidaccel_preset(pipe, p))
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=8, help="held-out captions (seeds 1000 + i)")
    parser.add_argument("--steps", type=int, default=None, help="default: the reference model's 50")
    parser.add_argument("--plans-dir", default=None, help="LeMiCa plan files to evaluate")
    parser.add_argument("--only", default=None, help="comma list of families: lemica,dbcache,fbcache,cache-dit,"
                                                      "radial,radial-knobs,svg2,svg2-iterations,equal-density,"
                                                      "calibration,calibration-fp,calibration-late,presets")
    parser.add_argument("--names", default=None, help="comma list: run only configurations whose name contains one")
    parser.add_argument("--device", default=None)
    parser.add_argument("--deadline-seconds", type=float, default=None, help="start no configuration after this")
    parser.add_argument("--tiny", default=None, help="a tiny pipeline kind instead of the reference (smoke test)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    loaded: LoadedPipeline = load_pipeline(tiny=args.tiny, device=args.device)
    steps = args.steps or loaded.call_defaults.get("num_inference_steps", 50)
    captions = [scene.caption for scene in data.evaluation_scenes()[: args.prompts]]
    pipe = loaded.pipe
    device = str(pipe._execution_device)
    record: dict[str, Any] = {
        "benchmark": "quality_reference", "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "model": loaded.name, "steps": steps, "captions": captions, "seeds": [1000 + i for i in range(len(captions))],
        "call": {k: v for k, v in loaded.call_defaults.items() if k != "num_inference_steps"},
    }
    if loaded.name == "reference":  # whether the weights passed acceptance decides what the numbers mean
        from vidaccel.reference.pipeline import reference_asset_dir

        record["model_card"] = json.loads((reference_asset_dir() / "model_card.json").read_text())

    def run_all() -> tuple[list[np.ndarray], list[float], int]:
        videos, seconds = [], []
        with last_block_calls(pipe) as calls:
            for i, caption in enumerate(captions):
                result = generate(loaded, caption, seed=1000 + i, progress=False, num_inference_steps=steps)
                videos.append(result.video)
                seconds.append(result.seconds)
        return videos, seconds, calls[0]

    rows: list[dict[str, Any]] = []
    record["configs"] = rows

    def write_record() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(json_safe(record), indent=1, default=str, allow_nan=False) + "\n")

    dense_videos, dense_seconds, dense_calls = run_all()
    record["dense"] = {"seconds": dense_seconds, "full_passes": dense_calls}
    print(f"dense: {sum(dense_seconds):.1f} s, {dense_calls} full passes", flush=True)
    for name, make in configurations(args, steps).items():
        if args.names and not any(part in name for part in args.names.split(",")):
            continue
        if args.deadline_seconds is not None and time.perf_counter() - started > args.deadline_seconds:
            rows.append({"config": name, "skipped": "deadline"})
            continue
        try:
            with make(pipe) as info:
                videos, seconds, calls = run_all()
        except Exception as error:  # a peer that is not installed or refuses this pipeline: record and go on
            rows.append({"config": name, "error": f"{type(error).__name__}: {error}"})
            print(f"{name}: {type(error).__name__}: {error}", flush=True)
            continue
        psnrs = [psnr(d, v) for d, v in zip(dense_videos, videos)]
        ssims = [ssim(d, v) for d, v in zip(dense_videos, videos)]
        row = {
            "config": name, "psnr_mean": float(np.mean(psnrs)), "psnr_min": float(np.min(psnrs)),
            "ssim_mean": float(np.mean(ssims)), "psnr": psnrs, "ssim": ssims,
            "full_passes": calls, "work_fraction": calls / dense_calls, "seconds": seconds,
            "speedup": sum(dense_seconds) / sum(seconds), **info,
        }
        rows.append(row)
        write_record()  # after every row: a run cut off at its time limit keeps what it measured
        print(f"{name:40s} PSNR {row['psnr_mean']:6.2f} (min {row['psnr_min']:6.2f})  SSIM {row['ssim_mean']:.4f}  "
              f"work {row['work_fraction']:.2f}  {row['speedup']:.2f}x", flush=True)
    write_record()
    return 0


if __name__ == "__main__":
    sys.exit(main())
