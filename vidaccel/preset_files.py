"""Preset files: a `Preset` as versioned JSON, with where it came from and what was measured.

    {"vidaccel_preset": 1,
     "name": "tuned-wan",
     "attention": {"method": "radial", "dense_warmup": 0.25, "dense_layers": 1},
     "cache": {"method": "dbcache", "threshold": 0.08},
     "text_encoder": {"method": "text_encoder_quant", "format": "int8"},
     "family": "wan",                       # optional: the model family the numbers were chosen for
     "created": {"by": "vidaccel tune", "vidaccel": "0.1.0", "date": "..."},
     "measured": {"psnr": 31.2, "speedup": 1.8, ...}}

Each method entry is ``{"method": <config name>, <field>: <value>, ...}``; fields left out take the config's
defaults. A config field that is itself called ``method`` (the text encoder's format) is written as ``format``,
as `TextEncoderQuant.to_dict` does. Reading is strict: an unknown method, an unknown field, a wrong schema version
or a missing file fails with a message that names the problem and the valid choices.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Optional

from .method import MethodConfig
from .presets import Preset

SCHEMA_KEY = "vidaccel_preset"
SCHEMA_VERSION = 1
ROLES = ("attention", "cache", "text_encoder")
TOP_LEVEL_KEYS = (SCHEMA_KEY, "name", *ROLES, "family", "created", "measured")
# The config field written under another key because "method" names the config itself.
_RENAMED_FIELDS = {"method": "format"}

# Modules whose configs are always registered; optional ones (other helpers' methods) are imported if present.
_CONFIG_MODULES = ("vidaccel.attention.dense", "vidaccel.attention.radial_method", "vidaccel.caching.dbcache",
                   "vidaccel.caching.lemica", "vidaccel.text_encoder.quantize")
_OPTIONAL_CONFIG_MODULES = ("vidaccel.attention.svg2",)


class PresetFileError(ValueError):
    """A preset file or dictionary is malformed: wrong schema, unknown method or field, bad value."""


@dataclasses.dataclass(frozen=True)
class PresetFile:
    """What a preset file holds: the preset and its free-form provenance and measurements."""

    preset: Preset
    created: dict[str, Any] = dataclasses.field(default_factory=dict)
    measured: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- the registry: method name -> config class, per role ------------------------------------------------------

def method_registry() -> dict[str, dict[str, type[MethodConfig]]]:
    """``{role: {method name: config class}}`` for every config class defined so far (discovered from the
    subclasses of `MethodConfig` and their ``name``). The first class found with a name wins, so a subclass that
    reuses its parent's name (a benchmark's timing wrapper) does not shadow the library's class."""
    for module in _CONFIG_MODULES:
        importlib.import_module(module)
    for module in _OPTIONAL_CONFIG_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    registry: dict[str, dict[str, type[MethodConfig]]] = {role: {} for role in ROLES}
    queue = list(MethodConfig.__subclasses__())
    while queue:  # breadth first: base classes before their subclasses
        cls = queue.pop(0)
        queue.extend(cls.__subclasses__())
        if cls.role in registry and cls.name and dataclasses.is_dataclass(cls):
            registry[cls.role].setdefault(cls.name, cls)
    return registry


def _field_key(field_name: str) -> str:
    return _RENAMED_FIELDS.get(field_name, field_name)


def _init_fields(cls: type[MethodConfig]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


# --- to and from dictionaries -----------------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    if isinstance(value, MethodConfig):  # a nested method (LeMiCa's fallback cache)
        return config_to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def config_to_dict(config: MethodConfig) -> dict[str, Any]:
    """``{"method": name, field: value, ...}`` with every field of the config (JSON types only)."""
    out: dict[str, Any] = {"method": config.name}
    for field in _init_fields(type(config)):
        out[_field_key(field.name)] = _jsonable(getattr(config, field.name))
    return out


def _allows_tuple(hint: Any) -> bool:
    if hint is tuple or typing.get_origin(hint) is tuple:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_allows_tuple(arg) for arg in typing.get_args(hint))
    return False


def _is_tuple_field(cls: type, field: dataclasses.Field) -> bool:
    """Whether the field's annotation is a tuple (JSON gives lists; frozen configs want tuples)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: keep the JSON value as it is
        return False
    return _allows_tuple(hints.get(field.name))


def _is_config_field(cls: type, field: dataclasses.Field) -> bool:
    """Whether the field holds another method config (written as a nested ``{"method": ...}`` object)."""
    try:
        hint = typing.get_type_hints(cls).get(field.name)
    except Exception:
        return False
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return any(isinstance(option, type) and issubclass(option, MethodConfig) for option in options)


def config_from_dict(role: str, data: Any, where: str = "preset") -> MethodConfig:
    """The config of `role` that `data` (``{"method": name, field: value, ...}``) describes."""
    if not isinstance(data, dict):
        raise PresetFileError(f"{where}: {role!r} must be an object like {{\"method\": \"...\"}} or null, "
                              f"got {type(data).__name__}")
    registry = method_registry()[role]
    method = data.get("method")
    if method is None:
        raise PresetFileError(f"{where}: {role!r} has no \"method\"; valid {role} methods: {', '.join(sorted(registry))}")
    if method not in registry:
        raise PresetFileError(f"{where}: unknown {role} method {method!r}; valid {role} methods: "
                              f"{', '.join(sorted(registry))}")
    cls = registry[method]
    fields = {_field_key(f.name): f for f in _init_fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key == "method":
            continue
        if key not in fields:
            raise PresetFileError(f"{where}: unknown field {key!r} for {role} method {method!r}; valid fields: "
                                  f"{', '.join(fields)}")
        field = fields[key]
        if isinstance(value, list) and _is_tuple_field(cls, field):
            value = tuple(value)
        elif isinstance(value, dict) and _is_config_field(cls, field):
            value = config_from_dict(role, value, f"{where}: {method}.{key}")
        kwargs[field.name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise PresetFileError(f"{where}: invalid {role} method {method!r}: {error}") from error


def preset_to_dict(preset: Preset, created: Optional[dict] = None, measured: Optional[dict] = None) -> dict:
    """The preset-file dictionary of `preset` (schema version 1)."""
    out: dict[str, Any] = {SCHEMA_KEY: SCHEMA_VERSION, "name": preset.name}
    for role in ROLES:
        config = getattr(preset, role)
        out[role] = config_to_dict(config) if config is not None else None
    if preset.family is not None:
        out["family"] = preset.family
    out["created"] = _jsonable(dict(created or {}))
    out["measured"] = _jsonable(dict(measured or {}))
    return out


def read_preset_dict(data: Any, where: str = "preset") -> PresetFile:
    """Preset, provenance and measurements from a preset-file dictionary; strict about everything."""
    if not isinstance(data, dict):
        raise PresetFileError(f"{where}: a preset file holds a JSON object, got {type(data).__name__}")
    if SCHEMA_KEY not in data:
        raise PresetFileError(f"{where}: not a vidaccel preset (no {SCHEMA_KEY!r} key); a preset file starts with "
                              f"{{\"{SCHEMA_KEY}\": {SCHEMA_VERSION}, ...}}")
    version = data[SCHEMA_KEY]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise PresetFileError(f"{where}: preset schema version {version!r} is not supported; this vidaccel reads "
                              f"version {SCHEMA_VERSION} (a newer vidaccel may have written the file)")
    unknown = [key for key in data if key not in TOP_LEVEL_KEYS]
    if unknown:
        raise PresetFileError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                              f"{', '.join(TOP_LEVEL_KEYS)}")
    name = data.get("name", "custom")
    if not isinstance(name, str) or not name:
        raise PresetFileError(f"{where}: \"name\" must be a non-empty string, got {name!r}")
    family = data.get("family")
    if family is not None and not isinstance(family, str):
        raise PresetFileError(f"{where}: \"family\" must be a string or null, got {family!r}")
    configs = {role: (config_from_dict(role, data[role], where) if data.get(role) is not None else None)
               for role in ROLES}
    extras = {}
    for key in ("created", "measured"):
        value = data.get(key) or {}
        if not isinstance(value, dict):
            raise PresetFileError(f"{where}: {key!r} must be an object, got {type(value).__name__}")
        extras[key] = value
    return PresetFile(Preset(**configs, name=name, family=family), **extras)


def preset_from_dict(data: Any) -> Preset:
    return read_preset_dict(data).preset


# --- files ------------------------------------------------------------------------------------------------------

def read_preset_file(path: "str | os.PathLike") -> PresetFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vidaccel preset file {str(path)!r} does not exist "
                                f"(write one with vidaccel.save_preset_file or `vidaccel tune`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PresetFileError(f"{path}: not valid JSON ({error})") from error
    return read_preset_dict(data, where=str(path))


def load_preset_file(path: "str | os.PathLike") -> Preset:
    """The preset stored in the preset file at `path`."""
    return read_preset_file(path).preset


def save_preset_file(path: "str | os.PathLike", preset: Preset, *, created: Optional[dict] = None,
                     measured: Optional[dict] = None) -> Path:
    """Write `preset` to `path` (atomically). ``created`` gains the vidaccel version and the time; ``measured`` is
    stored as given (e.g. what `vidaccel tune` measured)."""
    from . import __version__

    provenance = {"vidaccel": __version__,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  **(created or {})}
    from .metrics import json_safe

    data = json_safe(preset_to_dict(preset, provenance, measured))  # PSNR inf -> "inf": strict JSON
    read_preset_dict(json.loads(json.dumps(data)), where="preset to save")  # never write a file we cannot read
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        json.dump(data, f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(f.name, path)
    return path
