"""Presets: an attention method + a cache method + a text-encoder method, each a validated config."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from .attention.dense import DenseAttention
from .attention.radial_method import RadialAttention
from .caching import DBCache
from .method import MethodConfig


@dataclasses.dataclass(frozen=True)
class Preset:
    """What `vidaccel.apply` installs. Any part may be None (that part of the pipeline stays stock)."""

    attention: Optional[MethodConfig] = None
    cache: Optional[MethodConfig] = None
    text_encoder: Optional[MethodConfig] = None
    name: str = "custom"

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
        return {
            "name": self.name,
            **{role: (getattr(self, role).to_dict() if getattr(self, role) is not None else None)
               for role in ("attention", "cache", "text_encoder")},
        }


# Named presets. Each exists only once every method in it is implemented.
_PRESETS: dict[str, Callable[[], Preset]] = {
    "dense": lambda: Preset(attention=DenseAttention(), name="dense"),
    "radial": lambda: Preset(attention=RadialAttention(), name="radial"),
    "dbcache": lambda: Preset(cache=DBCache(), name="dbcache"),
}


def register_preset(name: str, factory: Callable[[], Preset]) -> None:
    _PRESETS[name] = factory


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def resolve_preset(preset: "str | Preset") -> Preset:
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, str):
        if preset in _PRESETS:
            return _PRESETS[preset]()
        raise ValueError(f"unknown vidaccel preset {preset!r}; valid presets: {', '.join(list_presets())}")
    raise TypeError(f"preset must be a preset name or a vidaccel.Preset, got {type(preset).__name__}")
