"""Presets: an attention method + a cache method + a text-encoder method, each a validated config."""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Callable, Optional

from .attention.dense import DenseAttention
from .attention.radial_method import RadialAttention
from .attention.svg2 import SVG2Attention
from .caching import DBCache
from .method import MethodConfig


@dataclasses.dataclass(frozen=True)
class Preset:
    """What `vidaccel.apply` installs. Any part may be None (that part of the pipeline stays stock)."""

    attention: Optional[MethodConfig] = None
    cache: Optional[MethodConfig] = None
    text_encoder: Optional[MethodConfig] = None
    name: str = "custom"
    # The model family these parameters were chosen for (None: any). Not part of equality: it says where the
    # numbers came from, not what runs.
    family: Optional[str] = dataclasses.field(default=None, compare=False)
    # Family-tuned presets (the combined ones): `apply` calls this with the pipeline's family to get the
    # parameters of that family. None: the preset is the same for every family.
    family_factory: Optional[Callable[[str], "Preset"]] = dataclasses.field(default=None, compare=False,
                                                                             repr=False)

    def __post_init__(self):
        for role in ("attention", "cache", "text_encoder"):
            config = getattr(self, role)
            if config is None:
                continue
            if not isinstance(config, MethodConfig):
                raise TypeError(f"Preset.{role} must be a vidaccel method config, got {type(config).__name__}")
            if config.role != role:
                raise TypeError(f"{type(config).__name__} is a {config.role} method; it cannot be Preset.{role}")

    def methods(self) -> list[MethodConfig]:
        return [c for c in (self.text_encoder, self.attention, self.cache) if c is not None]

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            **{role: (getattr(self, role).to_dict() if getattr(self, role) is not None else None)
               for role in ("attention", "cache", "text_encoder")},
        }
        if self.family is not None:
            out["family"] = self.family
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preset":
        """A preset from its preset-file dictionary (see `vidaccel.preset_files`)."""
        from .preset_files import preset_from_dict

        return preset_from_dict(data)

    def for_family(self, family: str) -> "Preset":
        """This preset with the parameters chosen for `family` (itself when it has no per-family parameters)."""
        if self.family_factory is None or self.family == family:
            return self
        return self.family_factory(family)


# --- combined presets -----------------------------------------------------------------------------------------
# A LeMiCa step plan (the cache with the best quality per computed step we measured), an int8 text encoder for
# "balanced" and "fast", and for "fast" Radial attention on the late computed steps. Families: "wan" (Wan 2.1
# T2V/I2V), "wan2.2" (two experts), "hunyuan", "cogvideox" (see `preset_family`). Every number of a combined
# preset lives in this one table, in the preset-file format (`vidaccel.preset_files`).
#
# Where the numbers come from (benchmarks/RESULTS.md, "Preset recalibration on v13"): on the reference model v13,
# 16 held-out captions, 50 steps, PSNR vs dense, each candidate built exactly as the preset
# (results/preset_candidates*_v13_2026-12-05.json): quality = plan 27/50 with the text encoder as loaded
# (33.1 dB; 26/50 gave 32.4), balanced = 22/50 + int8 (28.1 dB; 21/50 27.7), fast = 19/50 + int8 + Radial after
# half of the steps (25.5 dB; 18/50 with Radial 25.2): the smallest budgets whose mean clears the floors
# (32 / 28 / 25 dB) with a margin. Radial after the authors' 25% dense warm-up cost 0.8-2.2 dB on top of a plan there, so
# only "fast" uses it, and only after half of the steps. A plan belongs to one model: the reference model's
# plans ship with vidaccel; for other models `vidaccel plan` makes them (found through $VIDACCEL_PLANS_DIR). Where
# no plan fits, the fallback DBCache runs: thresholds from the same reference-model sweep of DBCache F1B0
# (0.05 / 0.1 / 0.2 gave 36.2 / 30.8 / 25.1 dB at 57 / 41 / 29% of the work). Only the Wan family was measured;
# the other families use the same budgets (plans are per model anyway) and the DBCache settings of session 1.
# Wan 2.2 and its two experts: DBCache warm-up counts the calls of each expert and CFG branch, and the
# high-noise expert serves only the first ~1/8 of the steps, so its warm-up is shorter.
_INT8_TEXT = {"method": "text_encoder_quant", "format": "int8"}
_PLAN_STEPS = 50  # the step count the budgets refer to; other step counts take the measured plan of equal error
# (or stretch the plan where none was measured; allow_rescale)


def _planned(budget: int, fallback: dict[str, Any]) -> dict[str, Any]:
    return {"method": "lemica", "budget": budget, "num_inference_steps": _PLAN_STEPS, "allow_rescale": True,
            "fallback": {"method": "dbcache", **fallback}}


_FAST_RADIAL = {"method": "radial", "dense_warmup": 0.5, "dense_layers": 1}
_FALLBACKS = {
    "quality": {"threshold": 0.06, "warmup_steps": 8, "max_consecutive_cached": 2},
    "balanced": {"threshold": 0.1, "warmup_steps": 6, "max_consecutive_cached": 3},
    "fast": {"threshold": 0.2, "warmup_steps": 4, "taylorseer_order": 1},
}
_WARMUP_WAN22 = {"quality": 4, "balanced": 3, "fast": 2}
_BUDGETS = {"quality": 27, "balanced": 22, "fast": 19}
# int8 costs about 2 dB of PSNR vs dense on the reference model at every budget (its text embeddings move the
# whole trajectory), which no plan up to 28 of 50 steps makes up above quality's 32 dB floor: quality keeps the
# text encoder as loaded.
_TEXT_ENCODERS = {"quality": None, "balanced": _INT8_TEXT, "fast": _INT8_TEXT}


def _family_entry(name: str, family: str) -> dict[str, Any]:
    fallback = dict(_FALLBACKS[name])
    if family == "wan2.2":
        fallback["warmup_steps"] = _WARMUP_WAN22[name]
    if family == "cogvideox" and name != "quality":
        fallback["threshold"] = {"balanced": 0.08, "fast": 0.16}[name]
    entry: dict[str, Any] = {"cache": _planned(_BUDGETS[name], fallback)}
    if _TEXT_ENCODERS[name] is not None:
        entry["text_encoder"] = _TEXT_ENCODERS[name]
    if name == "fast":
        entry["attention"] = dict(_FAST_RADIAL)
    return entry


def candidate_preset(budget: int, radial_warmup: Optional[float] = None, int8_text_encoder: bool = True,
                     name: str = "candidate") -> Preset:
    """A combined preset of the "wan" family with another LeMiCa budget (of 50 steps), optionally the int8 text
    encoder and, where `radial_warmup` is given, Radial attention after that fraction of dense steps: what
    calibration measures, built exactly as the shipped presets are (same fallback and rescaling)."""
    from .preset_files import preset_from_dict

    entry: dict[str, Any] = {"cache": _planned(budget, _FALLBACKS["balanced"])}
    if int8_text_encoder:
        entry["text_encoder"] = _INT8_TEXT
    if radial_warmup is not None:
        entry["attention"] = {**_FAST_RADIAL, "dense_warmup": radial_warmup}
    return preset_from_dict({"vidaccel_preset": 1, "name": name, **entry})


COMBINED_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    name: {family: _family_entry(name, family) for family in ("wan", "wan2.2", "hunyuan", "cogvideox")}
    for name in ("quality", "balanced", "fast")
}
# Used before the pipeline is known (listing, `vidaccel generate` checking its argument); `apply` re-resolves
# with the pipeline's family.
DEFAULT_FAMILY = "wan"


def preset_family(adapter) -> str:
    """The family key of a pipeline's parameters: the adapter's family, with Wan 2.2 (two experts) apart."""
    if adapter.family == "wan" and len(adapter.transformers()) > 1:
        return "wan2.2"
    return adapter.family


def combined_preset(name: str, family: Optional[str] = None) -> Preset:
    """Combined preset `name` with the parameters of `family` (unknown families get the default family's)."""
    from .preset_files import preset_from_dict

    table = COMBINED_PRESETS[name]
    chosen = family if family in table else DEFAULT_FAMILY
    preset = preset_from_dict({"vidaccel_preset": 1, "name": name, **table[chosen]})
    return dataclasses.replace(preset, family=chosen,
                               family_factory=lambda other: combined_preset(name, other))


# Named presets. Each exists only once every method in it is implemented. A factory may take a `family`
# keyword (the pipeline's `preset_family`); the preset it returns must then carry a `family_factory`.
_PRESETS: dict[str, Callable[..., Preset]] = {
    "dense": lambda: Preset(attention=DenseAttention(), name="dense"),
    "radial": lambda: Preset(attention=RadialAttention(), name="radial"),
    "svg2": lambda: Preset(attention=SVG2Attention(), name="svg2"),
    "dbcache": lambda: Preset(cache=DBCache(), name="dbcache"),
    **{name: (lambda family=None, name=name: combined_preset(name, family)) for name in COMBINED_PRESETS},
}


def register_preset(name: str, factory: Callable[[], Preset]) -> None:
    _PRESETS[name] = factory


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def _takes_family(factory: Callable[..., Preset]) -> bool:
    try:
        return "family" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def resolve_preset(preset: "str | os.PathLike | Preset", family: Optional[str] = None) -> Preset:
    """A `Preset` from a preset, a preset name, or the path of a preset JSON file (a name ending in ``.json`` or
    an existing file). `family` picks the per-family parameters of the combined presets."""
    if isinstance(preset, Preset):
        return preset.for_family(family) if family is not None else preset
    if isinstance(preset, os.PathLike):
        preset = os.fspath(preset)
    if isinstance(preset, str):
        if preset in _PRESETS:
            factory = _PRESETS[preset]
            return factory(family=family) if _takes_family(factory) else factory()
        if preset.lower().endswith(".json") or os.path.isfile(preset):
            from .preset_files import load_preset_file

            return load_preset_file(preset)
        raise ValueError(f"unknown vidaccel preset {preset!r}; valid presets: {', '.join(list_presets())} "
                         "(or the path of a preset .json file)")
    raise TypeError(f"preset must be a preset name, a preset file path or a vidaccel.Preset, "
                    f"got {type(preset).__name__}")
