"""Quick CPU probe of LeMiCa quality on the reference model: one caption, seed 0, PSNR of the decoded video vs
dense for shipped budget plans and for runs that skip a single step (how sensitive each step is).

    python benchmarks/lemica_step_probe.py --steps 50 --budgets 12,18,25 --skip 40
    python benchmarks/lemica_step_probe.py --steps 20 --budgets 5,7,8 --skip 2,5,10,15,18

Run it from the checkout with a venv's python (not `python -m`). One caption only: a probe, not a calibration
(that is `quality_reference.py`)."""

from __future__ import annotations

import argparse

import torch

import vidaccel
from vidaccel.metrics import psnr
from vidaccel.reference import GENERATION_DEFAULTS, reference_pipeline


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--budgets", type=_ints, default=[])
    parser.add_argument("--skip", type=_ints, default=[], help="steps to skip one at a time")
    parser.add_argument("--caption", default="a red circle moves left over a blue background")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    pipe = reference_pipeline(device=args.device)
    pipe.set_progress_bar_config(disable=True)
    call = {**GENERATION_DEFAULTS, "num_inference_steps": args.steps}

    def generate():
        return pipe(args.caption, **call, output_type="np", generator=torch.Generator().manual_seed(0)).frames[0]

    dense = generate()
    candidates = {f"LeMiCa budget {b} of {args.steps}": vidaccel.LeMiCa(budget=b, num_inference_steps=args.steps)
                  for b in args.budgets}
    for k in args.skip:
        candidates[f"skip only step {k}"] = vidaccel.LeMiCa(
            computed_steps=[s for s in range(args.steps) if s != k], num_inference_steps=args.steps)
    for name, cache in candidates.items():
        with vidaccel.apply(pipe, vidaccel.Preset(cache=cache, name="probe")):
            video = generate()
        print(f"{args.steps} steps  {name:28s} PSNR {psnr(dense, video):6.2f} dB", flush=True)


if __name__ == "__main__":
    main()
