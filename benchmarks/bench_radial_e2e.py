"""End to end Radial Attention on full-size random-weight Wan 2.1 architectures (run on an H100).

* Wan 2.1-1.3B, 480p, 81 frames, 50 steps with CFG: stock dense pipeline vs `radial` at the authors' settings
  (first 25% of steps dense, first layer dense), same process, same run.
* Wan 2.1-14B, 720p, 81 frames: one dense and one sparse transformer call timed in the same run, and the
  50-step CFG figure composed from them (it is composed, not measured end to end).
Beside each figure: its Amdahl bound from the measured attention share, the layout density and the dense-step
fraction. Writes JSON records (fields as in benchmarks/RESULTS.md) to --out.

    python benchmarks/bench_radial_e2e.py --out results.json [--steps 50] [--skip-14b]

Needs vidaccel installed (pip install -e . here; on a bare GPU box, a wheel of it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import sys
import time

import torch

import vidaccel  # noqa: E402
from vidaccel.attention.dense import DenseAttention  # noqa: E402
from vidaccel.attention.radial_method import RadialAttention  # noqa: E402
from vidaccel.presets import Preset  # noqa: E402
from vidaccel.runner import generate, load_pipeline  # noqa: E402


class AttentionTimer:
    """CUDA-event timing of every attention product of one transformer call (for the attention share)."""

    def __init__(self):
        self.events = []

    def wrap(self, attend):
        def timed(q, k, v, call):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = attend(q, k, v, call)
            end.record()
            self.events.append((start, end))
            return out
        return timed

    def total_ms(self) -> float:
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.events)


def timed_preset(config, timer: AttentionTimer):
    """A preset whose attention method reports each product's time to `timer`."""
    base_build = config.build

    @dataclasses.dataclass(frozen=True)
    class Timed(type(config)):
        def build(self):
            method = base_build()
            method.attend = timer.wrap(method.attend)
            return method

    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return vidaccel.Preset(attention=Timed(**fields), name=config.name)


def one_call(pipe, latents, text, step: int, steps: int) -> None:
    with torch.inference_mode(), pipe.transformer.cache_context("cond", step_index=step, num_inference_steps=steps):
        pipe.transformer(hidden_states=latents, timestep=pipe.scheduler.timesteps[step].expand(1),
                         encoder_hidden_states=text, return_dict=False)


def transformer_call_ms(pipe, latents, text, step: int, steps: int, repeats: int = 2, warmup: bool = True) -> float:
    """Median wall time of one transformer call at `step` (set through cache_context), after one warm-up call
    (kernel compile/autotune, layout build)."""
    if warmup:
        one_call(pipe, latents, text, step, steps)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        one_call(pipe, latents, text, step, steps)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def attention_share(pipe, latents, text, steps: int) -> tuple[float, float]:
    """(attention ms, call ms) of one dense transformer call through vidaccel's dense processors."""
    timer = AttentionTimer()
    with vidaccel.apply(pipe, timed_preset(DenseAttention(), timer)):
        one_call(pipe, latents, text, steps - 1, steps)  # warm-up
        timer.events.clear()
        call_ms = transformer_call_ms(pipe, latents, text, steps - 1, steps, repeats=1, warmup=False)
        return timer.total_ms(), call_ms


def amdahl(attention_fraction: float, attention_speedup: float, dense_step_fraction: float,
           sparse_layer_fraction: float) -> float:
    """End-to-end bound: sparse steps speed up the attention of their sparse layers only."""
    a = attention_fraction * sparse_layer_fraction
    sparse_step = (1 - a) + a / attention_speedup
    return 1.0 / (dense_step_fraction + (1 - dense_step_fraction) * sparse_step)


def record(**fields) -> dict:
    base = {"benchmark": "radial_e2e", "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name(0)}
    return {**base, **fields}


def wan_1_3b(steps: int, records: list, extra_warmups: tuple = ()) -> None:
    loaded = load_pipeline(arch="wan-1.3b", device="cuda")
    pipe = loaded.pipe
    layers = len(pipe.transformer.blocks)
    config = RadialAttention()  # authors' settings: 25% dense steps, first layer dense, decay 0.2, sink
    pipe.scheduler.set_timesteps(steps, device="cuda")
    lat = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    text = loaded.prompt_embeds[0]

    attn_ms, call_ms = attention_share(pipe, lat, text, steps)
    # one sparse attention product vs one dense product at this shape, same run
    timer = AttentionTimer()
    with vidaccel.apply(pipe, timed_preset(config, timer)) as handle:
        one_call(pipe, lat, text, steps - 1, steps)  # warm-up: kernel compile, layout build
        timer.events.clear()
        sparse_call_ms = transformer_call_ms(pipe, lat, text, steps - 1, steps, repeats=1, warmup=False)
        sparse_attn_ms = timer.total_ms()
        density = handle.stats()["attention"]["density"]
    per_layer_dense = attn_ms / layers
    per_layer_sparse = (sparse_attn_ms - per_layer_dense) / (layers - 1)  # layer 0 stays dense
    kernel_speedup = per_layer_dense / per_layer_sparse
    dense_steps = round(config.dense_warmup * steps) / steps
    share = attn_ms / call_ms
    print(f"wan-1.3b call {call_ms:.1f} ms, attention {attn_ms:.1f} ms ({share:.1%}); sparse call "
          f"{sparse_call_ms:.1f} ms; attention per layer {per_layer_dense:.2f} -> {per_layer_sparse:.2f} ms "
          f"({kernel_speedup:.2f}x) at density {density:.3f}", flush=True)

    generate(loaded, "", seed=0, progress=False, num_inference_steps=2)  # warm-up
    dense = generate(loaded, "", seed=0, progress=False, num_inference_steps=steps)
    with vidaccel.apply(pipe, "radial") as handle:
        generate(loaded, "", seed=0, progress=False, num_inference_steps=4)  # warm-up incl. sparse steps
        fast = generate(loaded, "", seed=0, progress=False, num_inference_steps=steps)
        stats = handle.stats()["attention"]
    # The same dense run against Radial with more of the steps dense (the quality/speed trade-off on record).
    for warmup in extra_warmups:
        with vidaccel.apply(pipe, Preset(attention=RadialAttention(dense_warmup=warmup), name="radial")) as handle:
            generate(loaded, "", seed=0, progress=False, num_inference_steps=4)
            other = generate(loaded, "", seed=0, progress=False, num_inference_steps=steps)
        other_dense = round(warmup * steps) / steps
        other_bound = amdahl(share, kernel_speedup, other_dense, (layers - 1) / layers)
        print(f"wan-1.3b radial with {other_dense:.0%} dense steps: {other.seconds:.1f} s, "
              f"{dense.seconds / other.seconds:.2f}x (Amdahl bound with the measured kernel {other_bound:.2f}x)",
              flush=True)
        records.append(record(method=f"radial end to end, {steps} steps CFG, dense warm-up {warmup}",
                              shape="wan-1.3b 480p 81f (1x12x32760x128), 30 layers", density=density,
                              baseline_ms=dense.seconds * 1000, method_ms=other.seconds * 1000,
                              speedup=dense.seconds / other.seconds, attention_share=share,
                              dense_step_fraction=other_dense, amdahl_bound_measured_kernel=other_bound))
    speedup = dense.seconds / fast.seconds
    bound_kernel = amdahl(share, kernel_speedup, dense_steps, (layers - 1) / layers)
    bound_ideal = amdahl(share, 1 / density, dense_steps, (layers - 1) / layers)
    print(f"wan-1.3b 480p 81f {steps} steps CFG: dense {dense.seconds:.1f} s, radial {fast.seconds:.1f} s, "
          f"{speedup:.2f}x; Amdahl bound with the measured kernel {bound_kernel:.2f}x, with 1/density "
          f"{bound_ideal:.2f}x", flush=True)
    shape = "wan-1.3b 480p 81f (1x12x32760x128), 30 layers"
    records += [
        record(method="radial attention product (per layer)", shape=shape, density=density,
               baseline_ms=per_layer_dense, method_ms=per_layer_sparse, speedup=kernel_speedup,
               note="dense = stock SDPA through vidaccel processors (PyTorch picks cuDNN)"),
        record(method=f"radial end to end, {steps} steps CFG", shape=shape, density=density,
               baseline_ms=dense.seconds * 1000, method_ms=fast.seconds * 1000, speedup=speedup,
               attention_share=share, dense_step_fraction=dense_steps, amdahl_bound_measured_kernel=bound_kernel,
               amdahl_bound_ideal=bound_ideal, peak_memory_gib=(fast.peak_memory_bytes or 0) / 2**30,
               layout_builds=stats["layout_builds"], attention_calls=stats["attention_calls"]),
    ]
    del loaded, pipe, dense, fast
    gc.collect()
    torch.cuda.empty_cache()


def wan_14b(steps: int, records: list) -> None:
    loaded = load_pipeline(arch="wan-14b", device="cuda")
    pipe = loaded.pipe
    layers = len(pipe.transformer.blocks)
    pipe.scheduler.set_timesteps(steps, device="cuda")
    lat = torch.randn(1, 16, 21, 90, 160, device="cuda", dtype=torch.bfloat16)
    text = loaded.prompt_embeds[0]
    attn_ms, dense_ms = attention_share(pipe, lat, text, steps)
    with vidaccel.apply(pipe, "radial") as handle:
        sparse_ms = transformer_call_ms(pipe, lat, text, steps - 1, steps, repeats=1)
        density = handle.stats()["attention"]["density"]
    config = RadialAttention()
    dense_steps = round(config.dense_warmup * steps) / steps
    share = attn_ms / dense_ms
    step_speedup = dense_ms / sparse_ms
    composed = 1 / (dense_steps + (1 - dense_steps) / step_speedup)
    bound = amdahl(share, 1 / density, 0.0, (layers - 1) / layers)
    print(f"wan-14b 720p 81f: dense call {dense_ms:.0f} ms (attention {share:.1%}), sparse call {sparse_ms:.0f} ms, "
          f"{step_speedup:.2f}x per step (bound {bound:.2f}x); composed {steps}-step CFG: {composed:.2f}x", flush=True)
    shape = "wan-14b 720p 81f (1x40x75600x128), 40 layers"
    records += [
        record(method="radial sparse transformer call vs dense call", shape=shape, density=density,
               baseline_ms=dense_ms, method_ms=sparse_ms, speedup=step_speedup, attention_share=share,
               amdahl_bound_ideal=bound, peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30),
        record(method=f"radial {steps} steps CFG, COMPOSED from per-call times", shape=shape, density=density,
               baseline_ms=2 * steps * dense_ms,
               method_ms=2 * steps * (dense_steps * dense_ms + (1 - dense_steps) * sparse_ms),
               speedup=composed, dense_step_fraction=dense_steps,
               amdahl_bound_ideal=amdahl(share, 1 / density, dense_steps, (layers - 1) / layers)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/radial_e2e.json")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--skip-1-3b", action="store_true")
    parser.add_argument("--skip-14b", action="store_true")
    parser.add_argument("--extra-dense-warmups", default="",
                        help="comma-separated dense warm-up fractions to run end to end on the 1.3B as well, "
                             "against the same dense run (e.g. 0.35,0.5)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    records: list = []
    try:
        if not args.skip_1_3b:
            wan_1_3b(args.steps, records, tuple(float(w) for w in args.extra_dense_warmups.split(",") if w))
        if not args.skip_14b:
            wan_14b(args.steps, records)
    finally:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
