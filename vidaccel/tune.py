"""Find the fastest preset that keeps a quality floor on a pipeline, and write it as a preset file.

For every candidate of a small grid (attention: stock or Radial with a few dense warm-ups; cache: none, DBCache
at a few thresholds, LeMiCa at a few budgets; text encoder: stock or int8), generate every prompt x seed, time
it, and compare each video with the stock pipeline's video of the same prompt and seed (PSNR, SSIM). A candidate
meets the floor when its *worst* prompt does. The fastest that meets it is returned, with the measurements, so
`write_tuned_preset` can store them in the preset file ("measured").

LeMiCa needs a step plan: the grid uses evenly spaced plans for the run's step count (``lemica_budgets``, the
fraction of steps computed), plus any plan files given (``lemica_plans``, made with `vidaccel plan`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Callable, Optional, Sequence

from .attention.radial_method import RadialAttention
from .caching import DBCache, LeMiCa
from .presets import Preset, preset_family
from .text_encoder import TextEncoderQuant


class TuneError(RuntimeError):
    """No candidate meets the quality floor (the message names the best quality found)."""


@dataclasses.dataclass(frozen=True)
class TuneGrid:
    """The candidates: every attention choice x every cache choice x every text-encoder choice, except the
    all-stock one. ``radial_warmups``: Radial dense warm-up fractions (empty: no Radial); ``dbcache_thresholds``;
    ``dbcache_warmup``: DBCache warm-up as a fraction of the steps; ``lemica_budgets``: fractions of the steps a
    LeMiCa plan computes; ``lemica_plans``: LeMiCa plan files; ``text_encoders``: None (stock) and/or formats."""

    radial_warmups: tuple[float, ...] = (0.25, 0.15)
    radial_block_size: int = 128
    dbcache_thresholds: tuple[float, ...] = (0.08, 0.15)
    dbcache_warmup: float = 0.2
    lemica_budgets: tuple[float, ...] = (0.5,)
    lemica_plans: tuple[str, ...] = ()
    text_encoders: tuple[Optional[str], ...] = (None, "int8")

    def __post_init__(self):
        for warmup in self.radial_warmups:
            if not 0 <= warmup < 1:
                raise ValueError(f"radial warm-up fractions must be in [0, 1), got {warmup}")
        for budget in self.lemica_budgets:
            if not 0 < budget <= 1:
                raise ValueError(f"LeMiCa budgets are fractions of the steps in (0, 1], got {budget}")
        if not 0 <= self.dbcache_warmup < 1:
            raise ValueError(f"dbcache_warmup is a fraction of the steps in [0, 1), got {self.dbcache_warmup}")
        if not self.text_encoders:
            raise ValueError("text_encoders needs at least one choice (None keeps the stock encoder)")

    def attention_choices(self) -> list[tuple[str, Optional[RadialAttention]]]:
        return [("dense", None)] + [(f"radial(warmup={w:g})", RadialAttention(dense_warmup=float(w),
                                                                             block_size=self.radial_block_size))
                                    for w in self.radial_warmups]

    def cache_choices(self, steps: int) -> list[tuple[str, Any]]:
        choices: list[tuple[str, Any]] = [("none", None)]
        warmup = int(round(self.dbcache_warmup * steps))
        choices += [(f"dbcache(t={t:g})", DBCache(threshold=float(t), warmup_steps=warmup))
                    for t in self.dbcache_thresholds]
        seen: set[tuple[int, ...]] = set()
        for budget in self.lemica_budgets:
            computed = even_plan(steps, budget)
            if len(computed) < steps and computed not in seen:  # a plan computing every step is no cache
                seen.add(computed)
                choices.append((f"lemica({len(computed)}/{steps})",
                                LeMiCa(computed_steps=computed, num_inference_steps=steps)))
        choices += [(f"lemica({plan})", LeMiCa(plan=plan, allow_rescale=True)) for plan in self.lemica_plans]
        return choices

    def text_encoder_choices(self) -> list[tuple[str, Optional[TextEncoderQuant]]]:
        return [(fmt or "stock", TextEncoderQuant(method=fmt) if fmt else None) for fmt in self.text_encoders]

    def candidates(self, steps: int) -> list[tuple[str, Preset]]:
        out = []
        for a_name, attention in self.attention_choices():
            for c_name, cache in self.cache_choices(steps):
                for t_name, encoder in self.text_encoder_choices():
                    if attention is None and cache is None and encoder is None:
                        continue  # the stock pipeline is the baseline, not a candidate
                    name = "+".join(part for part, config in ((a_name, attention), (c_name, cache),
                                                              (t_name, encoder)) if config is not None)
                    out.append((name, Preset(attention=attention, cache=cache, text_encoder=encoder, name=name)))
        return out


def even_plan(steps: int, budget: float) -> tuple[int, ...]:
    """About ``budget * steps`` steps spread evenly over the run, always the first and the last."""
    count = min(steps, max(2, int(round(budget * steps)))) if steps > 1 else 1
    if count == 1:
        return (0,)
    return tuple(sorted({int(round(i * (steps - 1) / (count - 1))) for i in range(count)}))


@dataclasses.dataclass(frozen=True)
class QualityFloor:
    min_psnr: float = 28.0
    min_ssim: Optional[float] = None

    def met_by(self, psnr_min: float, ssim_min: Optional[float]) -> bool:
        if not psnr_min >= self.min_psnr:  # NaN never meets it
            return False
        return self.min_ssim is None or (ssim_min is not None and ssim_min >= self.min_ssim)

    def describe(self) -> str:
        text = f"PSNR >= {self.min_psnr:g} dB"
        return text + (f" and SSIM >= {self.min_ssim:g}" if self.min_ssim is not None else "")


@dataclasses.dataclass
class CandidateResult:
    name: str
    preset: Preset
    seconds: Optional[float] = None
    speedup: Optional[float] = None
    psnr_min: Optional[float] = None
    psnr_mean: Optional[float] = None
    ssim_min: Optional[float] = None
    ssim_mean: Optional[float] = None
    per_run: list = dataclasses.field(default_factory=list)
    details: dict = dataclasses.field(default_factory=dict)
    meets_floor: bool = False
    error: Optional[str] = None

    def row(self) -> dict[str, Any]:
        return {"candidate": self.name, "seconds": self.seconds, "speedup": self.speedup,
                "psnr_min": self.psnr_min, "psnr_mean": self.psnr_mean, "ssim_min": self.ssim_min,
                "ssim_mean": self.ssim_mean, "meets_floor": self.meets_floor, **self.details,
                **({"error": self.error} if self.error else {})}


@dataclasses.dataclass
class TuneResult:
    best: CandidateResult
    dense_seconds: float
    results: list[CandidateResult]
    floor: QualityFloor
    prompts: list[str]
    seeds: list[int]
    call: dict[str, Any]
    model: str
    family: str

    def measured(self) -> dict[str, Any]:
        """What goes into the preset file's "measured"."""
        best = self.best
        return {"psnr_min": best.psnr_min, "psnr_mean": best.psnr_mean, "ssim_min": best.ssim_min,
                "ssim_mean": best.ssim_mean, "seconds": best.seconds, "dense_seconds": self.dense_seconds,
                "speedup": best.speedup, **best.details,
                "floor": {"min_psnr": self.floor.min_psnr, "min_ssim": self.floor.min_ssim,
                          "over": "worst prompt x seed"},
                "model": self.model, "family": self.family, "prompts": self.prompts, "seeds": self.seeds,
                "call": self.call, "per_run": best.per_run, "candidates": [r.row() for r in self.results]}


def _fmt(value: Optional[float], spec: str) -> str:
    if value is None:
        return "-"
    return "inf" if value == math.inf else format(value, spec)


def format_table(result: "TuneResult | None", results: Sequence[CandidateResult], dense_seconds: float) -> str:
    width = max([len("candidate")] + [len(r.name) for r in results])
    lines = [f"{'candidate':<{width}}  {'s':>8}  {'speedup':>7}  {'PSNR min':>8}  {'PSNR mean':>9}  "
             f"{'SSIM min':>8}  floor",
             f"{'dense (stock)':<{width}}  {dense_seconds:8.2f}  {'1.00x':>7}"]
    for r in results:
        mark = "error: " + r.error if r.error else ("yes" if r.meets_floor else "no")
        if result is not None and r is result.best:
            mark += "  <- chosen"
        speedup = _fmt(r.speedup, ".2f") + ("x" if r.speedup is not None else "")
        lines.append(f"{r.name:<{width}}  {_fmt(r.seconds, '8.2f'):>8}  {speedup:>7}  {_fmt(r.psnr_min, '.2f'):>8}  "
                     f"{_fmt(r.psnr_mean, '.2f'):>9}  {_fmt(r.ssim_min, '.4f'):>8}  {mark}")
    return "\n".join(lines)


def _details(stats: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a handle's stats worth keeping per candidate."""
    out: dict[str, Any] = {}
    cache = stats.get("cache")
    if cache:
        out["computed_transformer_calls"] = cache.get("computed")
        out["cached_transformer_calls"] = cache.get("cached")
    attention = stats.get("attention")
    if attention and attention.get("density") is not None:
        out["attention_density"] = attention["density"]
    return out


def tune(loaded, prompts: Sequence[str], *, floor: QualityFloor = QualityFloor(), grid: TuneGrid = TuneGrid(),
         seeds: Sequence[int] = (0,), overrides: Optional[dict[str, Any]] = None, warmup_steps: int = 2,
         log: Callable[[str], None] = print) -> TuneResult:
    """Measure every candidate of `grid` on `loaded` (a `vidaccel.runner.LoadedPipeline`) and return the fastest
    that meets `floor` on every prompt x seed. Raises `TuneError` when none does."""
    from .adapters import for_pipeline
    from .metrics import psnr, ssim
    from .runner import accelerated, generate, warm_up

    if not prompts:
        raise ValueError("tune needs at least one prompt")
    overrides = dict(overrides or {})
    call = {**loaded.call_defaults, **overrides}
    if call.get("output_type") == "latent":
        raise ValueError("tune compares decoded videos; this pipeline returns latents only (random-weight "
                         "architectures have no meaningful quality)")
    steps = call.get("num_inference_steps")
    if steps is None:
        raise ValueError("tune needs the step count: pass num_inference_steps (--steps)")
    family = preset_family(for_pipeline(loaded.pipe))
    candidates = grid.candidates(steps)
    runs = [(prompt, seed) for prompt in prompts for seed in seeds]

    def generate_all(label: str):
        out = []
        for prompt, seed in runs:
            out.append(generate(loaded, prompt, seed=seed, progress=False, **overrides))
        log(f"[tune] {label}: {statistics.mean(g.seconds for g in out):.2f} s per video")
        return out

    # Untimed warm-up: the stock pipeline, then each distinct attention method (kernel compilation, autotuning).
    if warmup_steps > 0:
        warm_up(loaded, runs[0][0], seed=runs[0][1], steps=warmup_steps, **overrides)
        for _, attention in grid.attention_choices():
            if attention is not None:
                with accelerated(loaded.pipe, Preset(attention=attention, name="warm-up")):
                    warm_up(loaded, runs[0][0], seed=runs[0][1], steps=warmup_steps, **overrides)

    dense = generate_all("dense (stock)")
    dense_seconds = statistics.mean(g.seconds for g in dense)
    results = []
    for name, preset in candidates:
        result = CandidateResult(name, preset)
        results.append(result)
        try:
            with accelerated(loaded.pipe, preset) as handle:
                videos = generate_all(name)
                result.details = _details(handle.stats())
                result.preset = handle.preset
        except Exception as error:  # one broken candidate must not end the search; it is reported in the table
            result.error = f"{type(error).__name__}: {error}"
            log(f"[tune] {name}: failed ({result.error})")
            continue
        psnrs = [psnr(d.video, v.video) for d, v in zip(dense, videos)]
        ssims = [ssim(d.video, v.video) for d, v in zip(dense, videos)]
        result.seconds = statistics.mean(v.seconds for v in videos)
        result.speedup = dense_seconds / result.seconds
        result.psnr_min, result.psnr_mean = min(psnrs), statistics.mean(psnrs)
        result.ssim_min, result.ssim_mean = min(ssims), statistics.mean(ssims)
        result.per_run = [{"prompt": p, "seed": s, "psnr": q, "ssim": m, "seconds": v.seconds,
                           "dense_seconds": d.seconds}
                          for (p, s), q, m, v, d in zip(runs, psnrs, ssims, videos, dense)]
        result.meets_floor = floor.met_by(result.psnr_min, result.ssim_min)

    passing = [r for r in results if r.meets_floor]
    if not passing:
        log(format_table(None, results, dense_seconds))
        measured = [r for r in results if r.psnr_min is not None]
        if not measured:
            raise TuneError(f"no candidate ran; errors: {'; '.join(f'{r.name}: {r.error}' for r in results)}")
        best = max(measured, key=lambda r: (r.psnr_min, r.ssim_min or 0.0))
        raise TuneError(
            f"no candidate meets the floor ({floor.describe()} on every prompt and seed): the best PSNR found was "
            f"{_fmt(best.psnr_min, '.2f')} dB (SSIM {_fmt(best.ssim_min, '.4f')}) by {best.name}. Lower "
            "--min-psnr/--min-ssim, or add gentler candidates (longer Radial warm-up, lower DBCache thresholds, "
            "larger LeMiCa budgets)")
    best = min(passing, key=lambda r: r.seconds)
    result = TuneResult(best, dense_seconds, results, floor, list(prompts), list(seeds),
                        {k: v for k, v in call.items() if isinstance(v, (int, float, str))}, loaded.name, family)
    log(format_table(result, results, dense_seconds))
    return result


def write_tuned_preset(result: TuneResult, path, name: str = "tuned"):
    """Store the chosen preset with its measurements; returns the path."""
    from .preset_files import save_preset_file

    preset = dataclasses.replace(result.best.preset, name=name, family=result.family, family_factory=None)
    return save_preset_file(path, preset, created={"by": "vidaccel tune", "candidate": result.best.name,
                                                   "model": result.model},
                            measured=result.measured())
