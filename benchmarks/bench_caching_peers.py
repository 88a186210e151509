"""Step caching against its peers, same process, same run (run on an H100).

Full-size Wan 2.1-1.3B (random weights, bf16), 480p, 81 frames, CFG, whole pipeline calls (`output_type="latent"`).
Thresholds are forced so every step after warm-up is cached: random weights make residual-diff decisions
meaningless, so each method is timed at a fixed, reported number of cached steps.

  dense                    stock pipeline
  vidaccel DBCache F8B0    warm-up 2, threshold forced
  cache-dit DBCache F8B0   warm-up 2, threshold forced (cache_dit from PyPI)
  diffusers FirstBlockCache  threshold forced
  vidaccel LeMiCa          computes every 3rd step

    python benchmarks/bench_caching_peers.py --out results.json [--steps 10]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch

import vidaccel
from vidaccel.runner import accelerated, generate, load_pipeline


def timed(loaded, steps: int) -> float:
    generate(loaded, "", seed=0, progress=False, num_inference_steps=steps)  # warm-up at the same settings
    return generate(loaded, "", seed=0, progress=False, num_inference_steps=steps).seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/caching_peers.json")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    loaded = load_pipeline(arch="wan-1.3b", device="cuda")
    pipe, steps = loaded.pipe, args.steps
    records = []

    def add(method, seconds, cached_calls, note=""):
        records.append({"benchmark": "caching_peers", "method": method, "date": datetime.date.today().isoformat(),
                        "device": torch.cuda.get_device_name(0), "shape": f"wan-1.3b 480p 81f, {steps} steps CFG",
                        "density": None, "baseline_ms": dense_s * 1000, "method_ms": seconds * 1000,
                        "speedup": dense_s / seconds, "cached_transformer_calls": cached_calls, "note": note})
        print(f"{method:28s} {seconds:7.2f} s  {dense_s / seconds:5.2f}x  cached calls {cached_calls}", flush=True)

    dense_s = timed(loaded, steps)
    add("dense", dense_s, 0)

    forced = vidaccel.Preset(cache=vidaccel.DBCache(Fn=8, Bn=0, threshold=1e9, warmup_steps=2), name="dbcache-forced")
    with accelerated(pipe, forced) as handle:
        seconds = timed(loaded, steps)
        add("vidaccel DBCache F8B0", seconds, handle.stats()["cache"]["cached"])

    try:
        import cache_dit
        from cache_dit import DBCacheConfig

        cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(
            Fn_compute_blocks=8, Bn_compute_blocks=0, residual_diff_threshold=1e9, max_warmup_steps=2,
            num_inference_steps=steps, enable_separate_cfg=True))
        seconds = timed(loaded, steps)
        stats = cache_dit.summary(pipe)
        cached = sum(len(getattr(s, "cached_steps", []) or []) for s in (stats if isinstance(stats, list) else [stats]))
        add(f"cache-dit {cache_dit.__version__} DBCache F8B0", seconds, cached,
            "cached steps as cache_dit.summary reports them (per CFG branch counting may differ)")
        cache_dit.disable_cache(pipe)
    except ImportError as error:
        print(f"cache-dit not available: {error}")

    from diffusers import FirstBlockCacheConfig

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    seconds = timed(loaded, steps)
    pipe.transformer.disable_cache()
    add("diffusers FirstBlockCache", seconds, None, "caches every call after the first of each branch")

    every_third = list(range(0, steps, 3))
    with accelerated(pipe, vidaccel.Preset(cache=vidaccel.LeMiCa(computed_steps=every_third,
                                                                 num_inference_steps=steps))) as handle:
        seconds = timed(loaded, steps)
        add("vidaccel LeMiCa every 3rd", seconds, handle.stats()["cache"]["cached"])

    with open(args.out, "w") as f:
        json.dump(records, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
