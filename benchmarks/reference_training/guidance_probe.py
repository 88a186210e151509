"""Colour match of a reference model at several CFG scales, on held-out or training captions (a diagnostic).

The acceptance (train_reference.py --stage acceptance) fixes the generation settings; this probe asks which
guidance scale a model wants, on captions that are not the acceptance set (--captions train) so the choice is
not tuned on the held-out captions, then reports the held-out figure at the chosen scale separately.

    python benchmarks/reference_training/guidance_probe.py ASSETS --captions train --count 12 --cfg 1,2,5 \
        --size 33,128,128 --steps 25 --out /tmp/probe.json      # CPU: ~10 s a video at one thread
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from pathlib import Path

import torch

from vidaccel.reference import GENERATION_DEFAULTS, data
from vidaccel.reference.evaluation import classify_object_colour
from vidaccel.reference.pipeline import reference_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("assets", type=Path, help="reference model folder (assets/reference layout)")
    parser.add_argument("--captions", choices=("held-out", "train"), default="train")
    parser.add_argument("--count", type=int, default=12, help="captions (held-out: the first COUNT)")
    parser.add_argument("--cfg", default="1,2,5", help="comma-separated guidance scales")
    parser.add_argument("--size", default="33,128,128", help="frames,height,width")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    frames, height, width = (int(x) for x in args.size.split(","))
    if args.captions == "train":
        scenes, seed_base = random.Random(1).sample(data.training_scenes(), args.count), 2000
    else:
        scenes, seed_base = data.evaluation_scenes()[: args.count], 1000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # WIP weights warn that they have not passed acceptance
        pipe = reference_pipeline(device=args.device, path=args.assets)
    pipe.set_progress_bar_config(disable=True)
    result = {"assets": str(args.assets), "captions": args.captions, "size": [frames, height, width],
              "steps": args.steps, "device": args.device, "by_cfg": {}}
    for cfg in (float(x) for x in args.cfg.split(",")):
        began, rows = time.perf_counter(), []
        for i, scene in enumerate(scenes):
            call = dict(GENERATION_DEFAULTS, num_inference_steps=args.steps, num_frames=frames, height=height,
                        width=width, guidance_scale=cfg)
            video = pipe(scene.caption, generator=torch.Generator().manual_seed(seed_base + i), output_type="pt",
                         **call).frames[0]
            predicted = classify_object_colour(video)
            rows.append({"caption": scene.caption, "expected": scene.colour, "predicted": predicted})
        rate = sum(r["predicted"] == r["expected"] for r in rows) / len(rows)
        result["by_cfg"][str(cfg)] = {"colour_match_rate": rate, "videos": rows,
                                      "seconds": round(time.perf_counter() - began, 1)}
        print(f"cfg {cfg}: colour match {rate:.3f} ({len(rows)} videos)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
