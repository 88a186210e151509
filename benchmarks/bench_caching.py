"""Cost of a computed vs a skipped transformer call for DBCache and LeMiCa, on the full-size Wan 2.1-1.3B
architecture with random weights at 480p, 81 frames (latents 1x16x21x60x104, text 1x512x4096).

The transformer is called directly in a loop that mimics a CFG denoising run: per step a "cond" and an
"uncond" call inside `cache_context(branch, step_index=i, num_inference_steps=N)`, guidance, and a FlowMatch
Euler step. Thresholds are forced so that the split between computed and skipped calls is known in advance:

* dense:   no cache, every call computed (the baseline);
* dbcache: DBCache F8B0, threshold 1e9, warm-up 2 -- every call after the first two of a branch skips the
  middle 22 blocks and pays for the 8 probe blocks;
* lemica:  LeMiCa computing every third step -- skipped calls run the embeddings and the output head only.

Every call is timed on its own (CUDA events on a GPU); the method's own log says which calls were skipped.
Random weights say nothing about quality; this measures cost only.

    python benchmarks/bench_caching.py --out benchmarks/results/caching.json      # GPU, full size
    python benchmarks/bench_caching.py --tiny --out /tmp/caching.json             # CPU, tiny model, seconds
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
WAN_TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=64, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
FULL_SHAPES = dict(latents=(1, 16, 21, 60, 104), text=(1, 512, 4096))
TINY_SHAPES = dict(latents=(1, 16, 3, 8, 8), text=(1, 16, 32))
GUIDANCE = 5.0


def _import_vidaccel():
    """vidaccel installed, or straight from this checkout (with its offline_planner folder mapped in)."""
    try:
        import vidaccel.offline_planner  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT))
        for name in [n for n in sys.modules if n == "vidaccel" or n.startswith("vidaccel.")]:
            del sys.modules[name]
        spec = importlib.util.spec_from_file_location(
            "vidaccel.offline_planner", ROOT / "offline_planner" / "__init__.py",
            submodule_search_locations=[str(ROOT / "offline_planner")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["vidaccel.offline_planner"] = module
        spec.loader.exec_module(module)
    import vidaccel
    from vidaccel.caching import DBCache, LeMiCa
    return vidaccel, DBCache, LeMiCa


def build_pipeline(tiny: bool, device: torch.device, dtype: torch.dtype):
    """A WanPipeline holding only a random-weight transformer and a FlowMatch scheduler (no text encoder or
    VAE: the loop feeds the transformer directly)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        transformer = WanTransformer3DModel(**(WAN_TINY if tiny else WAN_1_3B))
    transformer.eval().requires_grad_(False)
    # as from_pretrained(torch_dtype=...) does: the model's _keep_in_fp32_modules (norms, time embedder) stay fp32
    keep = getattr(transformer, "_keep_in_fp32_modules", None) or []
    for name, parameter in transformer.named_parameters():
        if not any(part in name.split(".") for part in keep):
            parameter.data = parameter.data.to(dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0 if tiny else 5.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)


class CallTimer:
    """Times each transformer call: CUDA events on a GPU (read after the run), wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.records: list[tuple[str, int, object, object]] = []

    def __call__(self, branch: str, step: int, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
        else:
            start = time.perf_counter()
            out = fn()
            end = time.perf_counter()
        self.records.append((branch, step, start, end))
        return out

    def milliseconds(self) -> dict[tuple[str, int], float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {(b, s): start.elapsed_time(end) for b, s, start, end in self.records}
        return {(b, s): (end - start) * 1e3 for b, s, start, end in self.records}


def denoise(pipe, noise: torch.Tensor, text: dict[str, torch.Tensor], steps: int, timer: CallTimer | None):
    """One CFG run of `steps` steps calling the transformer directly, as WanPipeline does."""
    transformer, scheduler = pipe.transformer, pipe.scheduler
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        predictions = {}
        for branch in ("cond", "uncond"):
            def call(branch=branch):
                return transformer(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=text[branch],
                                   return_dict=False)[0]
            with transformer.cache_context(branch, step_index=i, num_inference_steps=steps):
                predictions[branch] = timer(branch, i, call) if timer is not None else call()
        guided = predictions["uncond"] + GUIDANCE * (predictions["cond"] - predictions["uncond"])
        x = scheduler.step(guided.float(), t, x.float(), return_dict=False)[0].to(noise.dtype)
    return x


def measure(vidaccel, pipe, preset, noise, text, steps, device) -> dict:
    handle = vidaccel.apply(pipe, preset) if preset is not None else None
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timer = CallTimer(device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = denoise(pipe, noise, text, steps, timer)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
        times = timer.milliseconds()
        stats = handle.stats()["cache"] if handle is not None and "cache" in handle.stats() else None
    finally:
        if handle is not None:
            handle.remove()
    skipped = set()
    if stats is not None:
        for branch, entry in stats["per_branch"]["transformer"].items():
            skipped.update((branch, step) for step in entry["cached_steps"])
    computed_ms = [ms for key, ms in times.items() if key not in skipped]
    skipped_ms = [ms for key, ms in times.items() if key in skipped]
    result = {
        "generation_s": wall,
        "calls": len(times),
        "computed_calls": len(computed_ms),
        "skipped_calls": len(skipped_ms),
        "computed_call_ms": statistics.median(computed_ms) if computed_ms else None,
        "skipped_call_ms": statistics.median(skipped_ms) if skipped_ms else None,
        "skipped_over_computed": (statistics.median(skipped_ms) / statistics.median(computed_ms)
                                  if skipped_ms and computed_ms else None),
        "call_ms": {f"{branch}/{step}": round(ms, 3) for (branch, step), ms in sorted(times.items(),
                                                                                     key=lambda kv: kv[0][::-1])},
        "output_finite": bool(torch.isfinite(out).all()),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if stats is not None:
        result["stats"] = stats
    return result


def cache_dit_status() -> dict:
    """Whether cache-dit (the reference DBCache implementation) is importable here, for a side-by-side run."""
    spec = importlib.util.find_spec("cache_dit")
    if spec is None:
        return {"available": False, "note": "cache_dit is not installed on this machine; not compared"}
    import cache_dit

    return {"available": True, "version": getattr(cache_dit, "__version__", "unknown"),
            "note": "installed but not driven by this script; peer costs are in DESIGN.md section 4"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="tiny 4-layer model on CPU (for tests)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 10; 4 with --tiny)")
    parser.add_argument("--lemica-every", type=int, default=3, help="LeMiCa computes every k-th step")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    args = parser.parse_args(argv)

    vidaccel, DBCache, LeMiCa = _import_vidaccel()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation (5-10x slower on a busy CPU)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps = args.steps or (4 if args.tiny else 10)
    shapes = TINY_SHAPES if args.tiny else FULL_SHAPES

    pipe = build_pipeline(args.tiny, device, dtype)
    generator = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(shapes["latents"], generator=generator).to(device, dtype)
    text = {branch: torch.randn(shapes["text"], generator=generator).to(device, dtype) for branch in ("cond", "uncond")}

    with torch.inference_mode():  # kernels, allocator and autotuning warm before anything is timed
        denoise(pipe, noise, text, 2, None)

    dbcache = DBCache(Fn=None if args.tiny else 8, Bn=0, threshold=1e9, warmup_steps=2)
    lemica = LeMiCa(computed_steps=tuple(range(0, steps, args.lemica_every)), num_inference_steps=steps)
    presets = {"dense": None, "dbcache": vidaccel.Preset(cache=dbcache, name="dbcache-forced"),
               "lemica": vidaccel.Preset(cache=lemica, name="lemica-every-k")}
    methods = {name: measure(vidaccel, pipe, preset, noise, text, steps, device) for name, preset in presets.items()}
    dense_s = methods["dense"]["generation_s"]
    for entry in methods.values():
        entry["speedup_vs_dense"] = dense_s / entry["generation_s"]

    result = {
        "config": {
            "tiny": args.tiny, "steps": steps, "model": WAN_TINY if args.tiny else WAN_1_3B, "shapes": shapes,
            "dtype": str(dtype), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
            "dbcache": dbcache.to_dict(), "lemica": lemica.to_dict(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "methods": methods,
        "cache_dit": cache_dit_status(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, entry in methods.items():
        print(f"{name:8s} computed {entry['computed_calls']:3d} x {entry['computed_call_ms'] or 0:9.2f} ms   "
              f"skipped {entry['skipped_calls']:3d} x {entry['skipped_call_ms'] or 0:9.2f} ms   "
              f"run {entry['generation_s']:.2f} s ({entry['speedup_vs_dense']:.2f}x)")
    return result


if __name__ == "__main__":
    main()
