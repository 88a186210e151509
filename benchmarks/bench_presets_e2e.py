"""End to end: every vidaccel method, every combined preset and the peers, in one process, on one GPU.

Full-size Wan 2.1-1.3B (random weights, bf16), 480p, 81 frames, CFG, whole pipeline calls (`output_type="latent"`,
no text encoder or VAE: prompt embeddings are given), timed after an untimed warm-up per attention method:

  dense                      stock pipeline (the baseline of every speedup)
  radial                     vidaccel Radial attention (authors' settings)
  svg2                       vidaccel SVG2 attention, when `vidaccel.attention.svg2` is importable
  dbcache                    vidaccel DBCache F8B0, computed steps REPLAYED (see below)
  lemica                     vidaccel LeMiCa, the same computed steps as a plan
  quality, balanced, fast    combined presets: their LeMiCa budget REPLAYED as the plan made for the reference
                             model (the computed steps, stretched to --steps), Radial where the preset has it, int8
                             text encoder*
  cache-dit DBCache          cache-dit F1B0 with `steps_computation_mask` (static), at each work fraction in
                             PEER_FRACTIONS
  diffusers FirstBlockCache  `transformer.enable_cache(FirstBlockCacheConfig)`, its decision replaced by a fixed
                             step set, at each work fraction in PEER_FRACTIONS
  flex_attention radial      the same Radial block mask run by PyTorch flex_attention (compiled) in our processors
  dense (repeat)             the baseline again at the end, to show drift over the run

Replay: with random weights, data-dependent decisions say nothing about real models, so every cache computes a
FIXED set of steps, and each record says `"replayed": true` and lists the set. The single-method rows (vidaccel
DBCache, LeMiCa) share one set (the first warm-up steps plus evenly spaced ones up to SINGLE_METHOD_FRACTION) so
their costs compare. The peers run at the fractions of the work they needed on the reference model to reach
about the quality of each preset (PEER_FRACTIONS, from results/quality_reference_run2.json), with warm-up steps
first and the rest evenly spaced. The replayed DBCache still runs its probe blocks and computes the probe
difference on the device (without the host sync a real decision makes); FirstBlockCache likewise still runs its
first block. *The text encoder is absent here (embeddings are given), so int8 changes nothing in these runs.

    python benchmarks/bench_presets_e2e.py --out results.json [--steps 20] [--only radial,quality]
    python benchmarks/bench_presets_e2e.py --only wan14b --steps 50 --out wan14b.json   # Wan 14B 720p, composed
    python benchmarks/bench_presets_e2e.py --smoke --out /tmp/presets_smoke.json      # CPU, tiny Wan, seconds

`--only wan14b` loads the full-size Wan 2.1-14B architecture instead (720p 81f) and times, in one run, a dense
transformer call, a call with each preset's Radial attention past its warm-up, and a call LeMiCa skips; each
preset's 50-step CFG time is then COMPOSED from those per-call times and its replayed plan (and says so).

Every section is guarded: a failure is recorded in the JSON (`"error"`) and the next section runs. The JSON is
rewritten after every record, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

import vidaccel
from vidaccel import DBCache, LeMiCa, Preset, RadialAttention
from vidaccel.attention.radial_method import RadialAttentionMethod
from vidaccel.caching.dbcache import DBCacheMethod, DBCacheState, relative_l1
from vidaccel.metrics import json_safe
from vidaccel.presets import COMBINED_PRESETS, resolve_preset
from vidaccel.runner import generate, load_pipeline

HERE = Path(__file__).resolve().parent
SECTIONS = ("dense", "radial", "svg2", "dbcache", "lemica", "quality", "balanced", "fast", "cache-dit", "fbc",
            "flex-radial", "dense-repeat", "wan14b")
# Work fraction (full transformer passes / dense) the peers needed on the reference model for about each preset's
# quality (8 held-out captions, 50 steps; results/quality_reference_run2.json): cache-dit DBCache F1B0 t=0.1 ->
# 31.8 dB at 0.41, t=0.2 -> 25.3 dB at 0.29; diffusers FirstBlockCache t=0.1 -> 29.4 dB at 0.38, t=0.2 -> 25.5 dB
# at 0.22.
PEER_FRACTIONS = {"cache-dit": (0.41, 0.29), "fbc": (0.38, 0.22)}
PEER_WARMUP_STEPS = 8  # the peers' warm-up in that sweep (of 50 steps)
SINGLE_METHOD_FRACTION = 0.5  # the single cache methods and the peers
CACHE_WARMUP_FRACTION = 0.16  # DBCache-type warm-up: cache-dit's 8 of 50 steps


# --- replayed computed steps -------------------------------------------------------------------------------------

def replay_steps(steps: int, fraction: float, warmup: int) -> tuple[int, ...]:
    """The first `warmup` steps, then evenly spaced steps up to ``round(fraction * steps)`` in all, last included."""
    target = min(steps, max(1, round(fraction * steps)))
    warmup = min(warmup, target)
    chosen = set(range(warmup))
    rest = [s for s in range(warmup, steps)]
    extra = target - warmup
    if extra > 0 and rest:
        for i in range(extra):  # evenly over the remaining steps, ending at the last one
            chosen.add(rest[min(len(rest) - 1, round((i + 1) * len(rest) / extra) - 1)])
    return tuple(sorted(chosen))


@dataclasses.dataclass(frozen=True)
class ReplayedDBCache(DBCache):
    """DBCache whose decision is a fixed step set (`replay_computed_steps`) instead of the probe threshold."""

    replay_computed_steps: tuple[int, ...] = ()

    def build(self):
        return ReplayedDBCacheMethod(self)


class _ReplayedState(DBCacheState):
    def __init__(self, config, computed: frozenset):
        super().__init__(config)
        self.computed = computed

    def decide(self, step, probe):
        diff = None
        if self.reference_probe is not None and self.reference_probe.shape == probe.shape:
            diff = relative_l1(probe, self.reference_probe).detach()  # the device work of a real decision
        self.probe_diffs.append((step, diff))
        cache = step not in self.computed and self.reference_probe is not None and self.forecaster.ready
        self.calls += 1
        if cache:
            self.cached_total += 1
            self.consecutive_cached += 1
        else:
            self.consecutive_cached = 0
            self.reference_probe = probe
        return cache


class ReplayedDBCacheMethod(DBCacheMethod):
    def _state(self, transformer_name, branch):
        key = (transformer_name, branch)
        if key not in self._states:
            self._states[key] = _ReplayedState(self.config, frozenset(self.config.replay_computed_steps))
        return self._states[key]


def replayed(cache: DBCache, computed: tuple[int, ...]) -> ReplayedDBCache:
    fields = {f.name: getattr(cache, f.name) for f in dataclasses.fields(DBCache)}
    return ReplayedDBCache(**fields, replay_computed_steps=computed)


def reference_plan_steps(cache, steps: int) -> tuple[int, ...]:
    """The computed steps of the reference model's plan for a preset's LeMiCa budget, stretched to `steps`."""
    from vidaccel.offline_planner.plan_file import LeMiCaPlan

    plan = LeMiCaPlan.from_json(LeMiCa(budget=cache.budget, num_inference_steps=cache.num_inference_steps)
                                .plan_for_budget())
    return tuple(plan.computed_steps if plan.num_inference_steps == steps else plan.rescaled(steps).computed_steps)


# --- Radial mask through flex_attention ----------------------------------------------------------------------------

def _flex_block_mask_fn():
    spec = importlib.util.spec_from_file_location("bench_attention_kernel", HERE / "bench_attention_kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.flex_block_mask


class FlexRadialMethod(RadialAttentionMethod):
    """Radial attention with the very same plan, run by flex_attention instead of our Triton kernel."""

    flex = None
    block_mask_fn = None

    def __init__(self, config):
        super().__init__(config)
        self._masks: dict = {}

    def sparse_video_attention(self, q, k, v, video_layout, call, need_lse):
        if need_lse:
            raise ValueError("flex radial benchmark path handles video-only attention (Wan)")
        plan = self.plan_for(video_layout, q.device)
        key = (video_layout, str(q.device))
        if key not in self._masks:
            self._masks[key] = type(self).block_mask_fn(plan.layout, plan.dense_kv_ranges, q.device)
        out = type(self).flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=self._masks[key])
        return out.transpose(1, 2), None


@dataclasses.dataclass(frozen=True)
class FlexRadialAttention(RadialAttention):
    def build(self):
        return FlexRadialMethod(self)


# --- the run -------------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.device = "cpu" if args.smoke else "cuda"
        if self.smoke:
            torch.set_num_threads(1)
            self.loaded = load_pipeline(tiny="wan", device="cpu")
            self.call = dict(num_inference_steps=args.steps or 4, height=64, width=64, num_frames=9,
                             output_type="latent")
            self.shape = "tiny wan 64x64 9f (CPU smoke)"
        else:
            self.loaded = load_pipeline(arch="wan-1.3b", device="cuda")
            self.call = dict(num_inference_steps=args.steps or 20)
            self.shape = "wan-1.3b 480p 81f (1x12x32760x128), 30 layers, CFG"
        self.steps = self.call["num_inference_steps"]
        self.pipe = self.loaded.pipe
        self.records: list[dict] = []
        self.dense_s: float | None = None
        self._warm: set[str] = set()
        self.cache_warmup = max(1, round(CACHE_WARMUP_FRACTION * self.steps))
        self.single_steps = replay_steps(self.steps, SINGLE_METHOD_FRACTION, self.cache_warmup)

    # -- helpers ---------------------------------------------------------------------------------------------------
    def save(self):
        meta = {"benchmark": "presets_e2e", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
                "device": torch.cuda.get_device_name(0) if self.device == "cuda" else f"cpu ({platform.machine()})",
                "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                "vidaccel": vidaccel.__version__, "shape": self.shape, "steps": self.steps, "smoke": self.smoke,
                "random_weights": True, "cache_warmup_steps": self.cache_warmup,
                "single_method_computed_steps": list(self.single_steps),
                "peer_fractions": PEER_FRACTIONS,
                "note": "speed only (random weights); every cache replays a fixed computed-step set"}
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(json_safe({"meta": meta, "records": self.records}), indent=2, default=str) + "\n")

    def timed(self, **extra) -> tuple[float, float | None]:
        gen = generate(self.loaded, "a red circle moves left over a blue background", seed=0, progress=False,
                       **self.call, **extra)
        peak = gen.peak_memory_bytes / 2**30 if gen.peak_memory_bytes else None
        return gen.seconds, peak

    def warm(self, attention) -> None:
        """Untimed short run with this attention method (kernel compilation, autotuning, layout build)."""
        key = "dense" if attention is None else repr(attention)
        if key in self._warm:
            return
        short = {**self.call, "num_inference_steps": max(2, min(4, self.steps))}
        prompt = "warm-up"
        if attention is None:
            generate(self.loaded, prompt, seed=0, progress=False, **short)
        else:
            with vidaccel.apply(self.pipe, Preset(attention=attention, name="warm-up")):
                generate(self.loaded, prompt, seed=0, progress=False, **short)
        self._warm.add(key)

    def add(self, method: str, kind: str, **fields):
        seconds = fields.get("seconds")
        record = {"method": method, "kind": kind, "shape": self.shape, "steps": self.steps,
                  "dense_seconds": self.dense_s,
                  "speedup": (self.dense_s / seconds) if seconds and self.dense_s else None, **fields}
        self.records.append(record)
        self.save()
        if "error" in fields:
            print(f"{method:34s} ERROR {fields['error']}", flush=True)
        else:
            speed = f"{record['speedup']:.2f}x" if record["speedup"] else "-"
            print(f"{method:34s} {seconds:8.2f} s  {speed:>6}  computed {fields.get('computed_steps')}", flush=True)

    def section(self, name: str, fn) -> None:
        if self.args.only and name not in self.args.only and name != "dense":
            return
        try:
            fn()
        except Exception as error:  # record and go on with the next section
            traceback.print_exc()
            self.add(name, "error", error=f"{type(error).__name__}: {error}")
        finally:
            gc.collect()
            if self.device == "cuda":
                torch.cuda.empty_cache()

    def run_preset(self, method: str, kind: str, preset: Preset, **extra):
        self.warm(preset.attention)
        with vidaccel.apply(self.pipe, preset) as handle:
            seconds, peak = self.timed()
            stats = handle.stats()
        fields = {"seconds": seconds, "peak_memory_gib": peak, "preset": _preset_dict(handle.preset)}
        if "cache" in stats:
            fields["computed_steps"] = _computed_per_branch(stats["cache"])
        else:
            fields["computed_steps"] = {"all": self.steps}
        attention = stats.get("attention") or {}
        if attention.get("density") is not None:
            fields["attention_density"] = attention["density"]
        if attention.get("attention_calls") is not None:
            fields["attention_calls"] = attention["attention_calls"]
        self.add(method, kind, **fields, **extra)

    # -- sections --------------------------------------------------------------------------------------------------
    def dense(self):
        self.warm(None)
        seconds, peak = self.timed()
        self.dense_s = seconds
        self.add("dense", "baseline", seconds=seconds, peak_memory_gib=peak, computed_steps={"all": self.steps})

    def dense_repeat(self):
        """The baseline again at the end: how much the device drifted (clocks, heat) over the run."""
        seconds, peak = self.timed()
        self.add("dense (repeat, drift check)", "baseline", seconds=seconds, peak_memory_gib=peak,
                 computed_steps={"all": self.steps})

    def radial(self):
        self.run_preset("vidaccel radial", "vidaccel", resolve_preset("radial"))

    def svg2(self):
        if importlib.util.find_spec("vidaccel.attention.svg2") is None:
            self.add("vidaccel svg2", "skipped", note="vidaccel.attention.svg2 is not importable in this checkout")
            return
        if "svg2" in vidaccel.list_presets():
            preset = resolve_preset("svg2")
        else:
            from vidaccel.attention.svg2 import SVG2Attention

            preset = Preset(attention=SVG2Attention(), name="svg2")
        self.run_preset("vidaccel svg2", "vidaccel", preset)

    def replay_fields(self, computed):
        return {"replayed": True, "replayed_computed_steps": list(computed),
                "replayed_computed_fraction": len(computed) / self.steps}

    def dbcache(self):
        cache = replayed(DBCache(Fn=None if self.smoke else 8, Bn=0, warmup_steps=self.cache_warmup),
                         self.single_steps)
        self.run_preset("vidaccel DBCache F8B0 (replayed)", "vidaccel", Preset(cache=cache, name="dbcache-replayed"),
                        **self.replay_fields(self.single_steps))

    def lemica(self):
        cache = LeMiCa(computed_steps=self.single_steps, num_inference_steps=self.steps)
        self.run_preset(f"vidaccel LeMiCa {len(self.single_steps)}/{self.steps}", "vidaccel",
                        Preset(cache=cache, name="lemica-plan"), **self.replay_fields(self.single_steps))

    def combined(self, name: str):
        preset = resolve_preset(name, family="wan")
        computed = reference_plan_steps(preset.cache, self.steps)
        preset = dataclasses.replace(preset, cache=LeMiCa(computed_steps=computed, num_inference_steps=self.steps),
                                     family_factory=None)
        self.run_preset(f"preset {name} (plan replayed)", "vidaccel preset", preset,
                        table_entry=COMBINED_PRESETS[name]["wan"], text_encoder_note="no text encoder in this run",
                        **self.replay_fields(computed))

    @property
    def peer_warmup(self) -> int:
        return max(1, round(PEER_WARMUP_STEPS * self.steps / 50))

    def peer_steps(self, fraction: float) -> tuple[int, ...]:
        return replay_steps(self.steps, fraction, self.peer_warmup)

    def cache_dit(self):
        for fraction in PEER_FRACTIONS["cache-dit"]:
            self.cache_dit_at(self.peer_steps(fraction))

    def cache_dit_at(self, computed):
        import cache_dit
        from cache_dit import DBCacheConfig

        mask = [1 if step in computed else 0 for step in range(self.steps)]
        self.warm(None)
        cache_dit.enable_cache(self.pipe, cache_config=DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.08,  # F1B0, as in the quality sweep
            max_warmup_steps=self.peer_warmup, num_inference_steps=self.steps, enable_separate_cfg=True, steps_computation_mask=mask, steps_computation_policy="static"))
        try:
            seconds, peak = self.timed()
            summary = None
            try:
                stats = cache_dit.summary(self.pipe)
                stats = stats if isinstance(stats, list) else [stats]
                summary = [len(getattr(s, "cached_steps", []) or []) for s in stats]
            except Exception as error:  # the summary is a report, not the measurement
                summary = f"summary failed: {error}"
        finally:
            cache_dit.disable_cache(self.pipe)
        self.add(f"cache-dit {cache_dit.__version__} DBCache F1B0 (mask {len(computed)}/{self.steps})", "peer",
                 seconds=seconds, peak_memory_gib=peak, computed_steps={"per_branch (mask)": len(computed)},
                 cache_dit_cached_steps=summary, **self.replay_fields(computed))

    def fbc(self):
        for fraction in PEER_FRACTIONS["fbc"]:
            self.fbc_at(self.peer_steps(fraction))

    def fbc_at(self, computed_steps):
        from diffusers import FirstBlockCacheConfig

        computed = frozenset(computed_steps)
        scheduler = self.pipe.scheduler
        decisions = []

        def should_compute(_residual):  # replaces the threshold test: a fixed computed-step set
            step = scheduler.step_index if scheduler.step_index is not None else 0
            decisions.append(step in computed)
            return step in computed

        self.warm(None)
        self.pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
        try:
            hook = self.pipe.transformer.blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
            hook._should_compute_remaining_blocks = should_compute
            seconds, peak = self.timed()
        finally:
            self.pipe.transformer.disable_cache()
        # every call asks (the first of each branch too: step 0 is always in the computed set)
        self.add(f"diffusers FirstBlockCache (replayed {len(computed)}/{self.steps})", "peer", seconds=seconds,
                 peak_memory_gib=peak,
                 computed_steps={"decisions_compute": sum(decisions), "decisions_cache": len(decisions) - sum(decisions)},
                 **self.replay_fields(tuple(sorted(computed))))

    def flex_radial(self):
        from torch.nn.attention.flex_attention import flex_attention

        FlexRadialMethod.flex = flex_attention if self.smoke else torch.compile(flex_attention, dynamic=False)
        FlexRadialMethod.block_mask_fn = staticmethod(_flex_block_mask_fn())
        base = resolve_preset("radial").attention
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(RadialAttention)}
        self.run_preset("flex_attention radial mask", "peer", Preset(attention=FlexRadialAttention(**fields),
                                                                     name="flex-radial"))

    def run(self):
        started = time.perf_counter()
        self.section("dense", self.dense)
        self.section("radial", self.radial)
        self.section("svg2", self.svg2)
        self.section("dbcache", self.dbcache)
        self.section("lemica", self.lemica)
        for name in ("quality", "balanced", "fast"):
            self.section(name, lambda name=name: self.combined(name))
        self.section("cache-dit", self.cache_dit)
        self.section("fbc", self.fbc)
        self.section("flex-radial", self.flex_radial)
        self.section("dense-repeat", self.dense_repeat)
        print(f"total {time.perf_counter() - started:.0f} s -> {self.args.out}", flush=True)


# --- Wan 2.1-14B 720p: per-call times, composed ---------------------------------------------------------------------

def _radial_bench_module():
    spec = importlib.util.spec_from_file_location("bench_radial_e2e", HERE / "bench_radial_e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def composed_seconds(computed: tuple[int, ...], steps: int, warmup_steps: int | None, dense_ms: float,
                     sparse_ms: float | None, skipped_ms: float) -> float:
    """CFG run time from per-call times: computed steps before the Radial warm-up (or all, without Radial) cost a
    dense call, later computed steps a sparse call, other steps a skipped call; two calls per step."""
    total = 0.0
    for step in range(steps):
        if step not in computed:
            total += skipped_ms
        elif warmup_steps is None or step < warmup_steps:
            total += dense_ms
        else:
            total += sparse_ms
    return 2 * total / 1000


def wan14b_composed(args) -> None:
    from vidaccel.attention.sparse_base import resolve_warmup

    radial_bench = _radial_bench_module()
    steps = args.steps or 50
    loaded = load_pipeline(arch="wan-14b", device="cuda")
    pipe = loaded.pipe
    pipe.scheduler.set_timesteps(steps, device="cuda")
    latents = torch.randn(1, 16, 21, 90, 160, device="cuda", dtype=torch.bfloat16)
    text = loaded.prompt_embeds[0]
    shape = "wan-14b 720p 81f (1x40x75600x128), 40 layers, CFG"
    records = []
    device = torch.cuda.get_device_name(0)

    def save():
        meta = {"benchmark": "presets_e2e_wan14b", "date": datetime.date.today().isoformat(), "device": device,
                "torch": torch.__version__, "shape": shape, "steps": steps, "random_weights": True,
                "note": "per-call times measured in this run; 50-step figures COMPOSED from them"}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(json_safe({"meta": meta, "records": records}), indent=2) + "\n")

    dense_ms = radial_bench.transformer_call_ms(pipe, latents, text, steps - 1, steps)
    print(f"wan14b dense call {dense_ms:.0f} ms", flush=True)
    # A call LeMiCa skips: compute step 0 (stores the residual), then time step 1 of the same generation.
    skipped = []
    with vidaccel.apply(pipe, Preset(cache=LeMiCa(computed_steps=(0,), num_inference_steps=steps), name="skip")):
        for _ in range(3):
            radial_bench.one_call(pipe, latents, text, 0, steps)
            torch.cuda.synchronize()
            start = time.perf_counter()
            radial_bench.one_call(pipe, latents, text, 1, steps)
            torch.cuda.synchronize()
            skipped.append((time.perf_counter() - start) * 1000)
    skipped_ms = sorted(skipped)[1]
    print(f"wan14b skipped call {skipped_ms:.1f} ms", flush=True)
    records.append({"method": "per-call times", "kind": "measured", "shape": shape, "dense_call_ms": dense_ms,
                    "lemica_skipped_call_ms": skipped_ms})
    save()
    sparse_ms: dict[str, float] = {}
    dense_s = 2 * steps * dense_ms / 1000
    for name in ("quality", "balanced", "fast"):
        preset = resolve_preset(name, family="wan")
        computed = reference_plan_steps(preset.cache, steps)
        warmup = None
        radial_ms = None
        if preset.attention is not None:
            key = repr(preset.attention)
            if key not in sparse_ms:
                with vidaccel.apply(pipe, Preset(attention=preset.attention, name="sparse")) as handle:
                    sparse_ms[key] = radial_bench.transformer_call_ms(pipe, latents, text, steps - 1, steps,
                                                                      repeats=1)
                    density = handle.stats()["attention"].get("density")
                print(f"wan14b {name} radial call {sparse_ms[key]:.0f} ms (density {density})", flush=True)
            radial_ms = sparse_ms[key]
            warmup = resolve_warmup(preset.attention.dense_warmup, steps)
        seconds = composed_seconds(computed, steps, warmup, dense_ms, radial_ms, skipped_ms)
        records.append({"method": f"preset {name} (plan replayed), COMPOSED from per-call times", "kind":
                        "vidaccel preset", "shape": shape, "steps": steps, "dense_seconds": dense_s,
                        "seconds": seconds, "speedup": dense_s / seconds, "replayed_computed_steps": list(computed),
                        "radial_call_ms": radial_ms, "radial_dense_warmup_steps": warmup,
                        "dense_call_ms": dense_ms, "skipped_call_ms": skipped_ms,
                        "table_entry": COMBINED_PRESETS[name]["wan"]})
        print(f"wan14b preset {name}: composed {seconds:.0f} s vs dense {dense_s:.0f} s = {dense_s / seconds:.2f}x",
              flush=True)
        save()



def _computed_per_branch(cache_stats: dict) -> dict:
    return {f"{name}/{branch}": entry["computed"] for name, branches in cache_stats["per_branch"].items()
            for branch, entry in branches.items()}


def _preset_dict(preset: Preset) -> dict:
    out = {"name": preset.name}
    for role in ("attention", "cache", "text_encoder"):
        config = getattr(preset, role)
        out[role] = None if config is None else {"class": type(config).__name__, **dataclasses.asdict(config)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--steps", type=int, help="denoising steps (default 20 on the GPU, 4 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny Wan pipeline: checks the script in seconds")
    parser.add_argument("--only", type=lambda s: [p.strip() for p in s.split(",") if p.strip()],
                        help=f"comma-separated sections to run (dense always runs): {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    if args.only:
        unknown = [s for s in args.only if s not in SECTIONS]
        if unknown:
            parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke for the CPU check)")
    if args.only and "wan14b" in args.only:
        if len(args.only) > 1 or args.smoke:
            parser.error("--only wan14b runs alone (it loads the 14B architecture instead of the 1.3B), on a GPU")
        wan14b_composed(args)
        return 0
    Bench(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
