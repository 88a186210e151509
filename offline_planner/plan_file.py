"""LeMiCa plan files: which steps to compute, for which model and step count, and how the plan was measured.

A plan is only valid for the transformer(s) and step count it was measured on, so the file records the model
identity (class names, a fingerprint of each transformer config and, in plans made since they exist, a signature
of each transformer's weights), the scheduler, the step count, the size it was measured at, the chosen segments
with their measured errors, the prompts and how it was made. Files are versioned JSON
(``"schema": "vidaccel.lemica-plan/1"``) and are read strictly: a wrong or corrupted file fails with a message that
says what is wrong, never with a half-loaded plan.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import math
import numbers
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from .solver import PlanSegment, PlanSolution
from .weights_signature import checked_signature, first_transformer_difference

SCHEMA_NAME = "vidaccel.lemica-plan"
SCHEMA_VERSION = 1
SCHEMA = f"{SCHEMA_NAME}/{SCHEMA_VERSION}"


def plan_filename(num_inference_steps: int, budget: int) -> str:
    """The name `vidaccel plan` gives a plan file; `parse_plan_filename` reads it back."""
    return f"lemica-{num_inference_steps}steps-{budget}computed.json"


_PLAN_FILENAME = re.compile(r"lemica-(?P<steps>\d+)steps-(?P<budget>\d+)computed\.json")


def parse_plan_filename(name: str) -> tuple[int, int] | None:
    """(num_inference_steps, budget) of a plan file name written by `plan_filename`, else None."""
    match = _PLAN_FILENAME.fullmatch(name)
    return (int(match["steps"]), int(match["budget"])) if match else None

# Hex digits of SHA-256 kept in a fingerprint: 64 bits tell configs apart and stay readable in messages.
_FINGERPRINT_HEX_DIGITS = 16

_MAKE_A_PLAN = "make a plan for this pipeline with `vidaccel plan`"


class PlanFileError(ValueError):
    """A plan file or plan dictionary is malformed: not JSON, wrong schema, missing or ill-typed fields."""


class PlanMismatchError(ValueError):
    """A plan was made for another model or step count than the pipeline it is applied to."""


class PlanWarning(UserWarning):
    """A plan is used outside the conditions it was measured in (rescaled, or another scheduler)."""


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """Stable hash of a model config: SHA-256 of its canonical JSON, private ``_`` keys ignored at every level.

    Private keys (diffusers' ``_class_name``, ``_diffusers_version``, ``_name_or_path``) say where a config came
    from, not what the model computes, so two copies of one model fingerprint alike. Tuples hash like lists.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    canonical = json.dumps(_canonical(config, "config"), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:_FINGERPRINT_HEX_DIGITS]


def _canonical(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}")
            if not key.startswith("_"):
                result[key] = _canonical(item, f"{where}.{key}")
        return result
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise TypeError(f"{where} holds a {type(value).__name__}, which has no canonical JSON form")


@dataclasses.dataclass(frozen=True)
class PlanCreation:
    """How a plan was made."""

    vidaccel_version: str
    date: str  # ISO 8601 with time zone
    command_line: tuple[str, ...]

    @classmethod
    def now(cls, command_line: Sequence[str] | None = None) -> PlanCreation:
        """Creation info for a plan made now by this vidaccel; ``command_line`` defaults to ``sys.argv``."""
        from .. import __version__  # at call time: the package __init__ may still be importing this module

        return cls(
            vidaccel_version=__version__,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command_line=tuple(sys.argv if command_line is None else command_line),
        )

    def __post_init__(self) -> None:
        _require_str(self.vidaccel_version, "creation.vidaccel_version")
        _require_str(self.date, "creation.date")
        try:
            parsed = datetime.datetime.fromisoformat(self.date)
        except ValueError:
            raise ValueError(f"creation.date must be an ISO 8601 date, got {self.date!r}") from None
        if parsed.tzinfo is None:
            raise ValueError(f"creation.date must carry a time zone, got {self.date!r}")
        object.__setattr__(self, "command_line", _str_tuple(self.command_line, "creation.command_line"))


@dataclasses.dataclass(frozen=True)
class LeMiCaPlan:
    """A LeMiCa step plan: compute ``computed_steps`` (0-based, always including step 0), reuse the rest.

    ``segments`` are the measured segments of the chosen path with their ``error_metric``; both are empty/None
    when the plan's errors were not measured at this step count (a rescaled or hand-written plan).
    ``rescaled_from`` is the step count the plan was measured at when it has been rescaled since.
    ``weights_signatures`` has one entry per transformer (see `weights_signature`; None where the weights could not
    be read); the whole field is None in plans written before signatures existed, which then match any weights.
    """

    transformer_classes: tuple[str, ...]
    config_fingerprints: tuple[str, ...]
    scheduler_class: str
    scheduler_config: dict[str, Any]
    num_inference_steps: int
    height: int
    width: int
    num_frames: int
    computed_steps: tuple[int, ...]
    error_metric: str | None
    segments: tuple[PlanSegment, ...]
    prompts: tuple[str, ...]
    creation: PlanCreation
    rescaled_from: int | None = None
    weights_signatures: tuple[tuple[tuple[str, float], ...] | None, ...] | None = None

    def __post_init__(self) -> None:
        set_field = functools.partial(object.__setattr__, self)  # normalising fields of a frozen dataclass
        set_field("transformer_classes", _str_tuple(self.transformer_classes, "transformer_classes"))
        set_field("config_fingerprints", _str_tuple(self.config_fingerprints, "config_fingerprints"))
        if not self.transformer_classes:
            raise ValueError("transformer_classes must name at least one transformer class")
        if len(self.config_fingerprints) != len(self.transformer_classes):
            raise ValueError(
                f"one config fingerprint per transformer is needed: {len(self.transformer_classes)} classes, "
                f"{len(self.config_fingerprints)} fingerprints"
            )
        _require_str(self.scheduler_class, "scheduler_class")
        if not isinstance(self.scheduler_config, Mapping):
            raise ValueError(f"scheduler_config must be a mapping, got {type(self.scheduler_config).__name__}")
        try:  # a JSON round trip makes the stored config a detached, plain, JSON-representable dict
            set_field("scheduler_config", json.loads(json.dumps(dict(self.scheduler_config), allow_nan=False)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"scheduler_config must be representable as JSON: {error}") from None
        for name in ("num_inference_steps", "height", "width", "num_frames"):
            _require_positive_int(getattr(self, name), name)
        set_field("computed_steps", _check_computed_steps(self.computed_steps, self.num_inference_steps))
        set_field("segments", tuple(self.segments))
        self._check_segments()
        set_field("prompts", _str_tuple(self.prompts, "prompts"))
        if not isinstance(self.creation, PlanCreation):
            raise ValueError(f"creation must be a PlanCreation, got {type(self.creation).__name__}")
        if self.rescaled_from is not None:
            _require_positive_int(self.rescaled_from, "rescaled_from")
        if self.weights_signatures is not None:
            set_field("weights_signatures", _check_weights_signatures(self.weights_signatures,
                                                                      len(self.transformer_classes)))

    def _check_segments(self) -> None:
        if not self.segments:
            if self.error_metric is not None:
                raise ValueError("error_metric is set but the plan has no measured segments")
            return
        if self.error_metric is None:
            raise ValueError("measured segments need an error_metric naming what their errors measure")
        _require_str(self.error_metric, "error_metric")
        ends = (*self.computed_steps[1:], self.num_inference_steps)
        expected = list(zip(self.computed_steps, ends))
        found = []
        for index, segment in enumerate(self.segments):
            if not isinstance(segment, PlanSegment):
                raise ValueError(f"segments[{index}] must be a PlanSegment, got {type(segment).__name__}")
            error = segment.error
            if isinstance(error, bool) or not isinstance(error, numbers.Real) or not 0 <= error < math.inf:
                raise ValueError(f"segments[{index}].error must be finite and non-negative, got {error!r}")
            found.append((segment.start, segment.end))
        if found != expected:
            raise ValueError(
                f"segments {_arrows(found)} do not match computed_steps {list(self.computed_steps)} "
                f"(expected {_arrows(expected)})"
            )

    # --- derived values ------------------------------------------------------------------------------------------

    @property
    def budget(self) -> int:
        """Number of computed steps."""
        return len(self.computed_steps)

    @property
    def max_error(self) -> float | None:
        return max(segment.error for segment in self.segments) if self.segments else None

    @property
    def sum_error(self) -> float | None:
        return math.fsum(segment.error for segment in self.segments) if self.segments else None

    # --- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_solution(
        cls,
        solution: PlanSolution,
        *,
        transformer_classes: Sequence[str],
        config_fingerprints: Sequence[str],
        scheduler_class: str,
        scheduler_config: Mapping[str, Any],
        height: int,
        width: int,
        num_frames: int,
        error_metric: str,
        prompts: Sequence[str],
        command_line: Sequence[str] | None = None,
        weights_signatures: Sequence[Sequence[Sequence[Any]] | None] | None = None,
    ) -> LeMiCaPlan:
        """A plan from a solver result, stamped with creation info for now."""
        return cls(
            transformer_classes=tuple(transformer_classes),
            config_fingerprints=tuple(config_fingerprints),
            scheduler_class=scheduler_class,
            scheduler_config=dict(scheduler_config),
            num_inference_steps=solution.num_steps,
            height=height,
            width=width,
            num_frames=num_frames,
            computed_steps=solution.computed_steps,
            error_metric=error_metric,
            segments=solution.segments,
            prompts=tuple(prompts),
            creation=PlanCreation.now(command_line),
            weights_signatures=None if weights_signatures is None else tuple(weights_signatures),
        )

    # --- serialisation -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The plan as the JSON object a plan file holds."""
        errors = None
        if self.segments:
            errors = {
                "metric": self.error_metric,
                "max_error": self.max_error,
                "sum_error": self.sum_error,
                "segments": [{"start": s.start, "end": s.end, "error": s.error} for s in self.segments],
            }
        model = {
            "transformer_classes": list(self.transformer_classes),
            "config_fingerprints": list(self.config_fingerprints),
        }
        if self.weights_signatures is not None:  # absent rather than null, as in plans older than signatures
            model["weights_signatures"] = [
                None if signature is None else [list(pair) for pair in signature]
                for signature in self.weights_signatures
            ]
        return {
            "schema": SCHEMA,
            "model": model,
            "scheduler": {"class": self.scheduler_class, "config": self.scheduler_config},
            "num_inference_steps": self.num_inference_steps,
            "measured_at": {"height": self.height, "width": self.width, "num_frames": self.num_frames},
            "budget": self.budget,
            "computed_steps": list(self.computed_steps),
            "errors": errors,
            "prompts": list(self.prompts),
            "rescaled_from": self.rescaled_from,
            "creation": {
                "vidaccel_version": self.creation.vidaccel_version,
                "date": self.creation.date,
                "command_line": list(self.creation.command_line),
            },
        }

    @classmethod
    def from_dict(cls, data: Any) -> LeMiCaPlan:
        """Parse and validate a plan object; raises :class:`PlanFileError` saying what is wrong."""
        try:
            return _parse_plan(data)
        except PlanFileError:
            raise
        except ValueError as error:
            raise PlanFileError(str(error)) from None

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the plan file; the file is replaced atomically, so a crash never leaves half a plan."""
        text = _format_json(self.to_dict()) + "\n"
        directory = os.path.dirname(os.path.abspath(path))
        handle, temporary = tempfile.mkstemp(prefix=".lemica-plan-", suffix=".json", dir=directory)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
            os.chmod(temporary, 0o644)  # mkstemp makes it owner-only; a plan file is meant to be shared
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> LeMiCaPlan:
        """Read a plan file; raises :class:`PlanFileError` (naming the file) when it is not a valid plan."""
        with open(path, "rb") as file:
            raw = file.read()
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError as error:
            raise PlanFileError(f"{os.fspath(path)}: not a JSON text file ({error})") from None
        except ValueError as error:  # json.JSONDecodeError and the NaN/Infinity rejection
            raise PlanFileError(f"{os.fspath(path)}: not valid JSON ({error})") from None
        try:
            return cls.from_dict(data)
        except PlanFileError as error:
            raise PlanFileError(f"{os.fspath(path)}: {error}") from None

    # --- use on a pipeline ---------------------------------------------------------------------------------------

    def validate_against(
        self,
        transformer_classes: Sequence[str],
        config_fingerprints: Sequence[str],
        scheduler_class: str,
        num_inference_steps: int,
        allow_rescale: bool = False,
        *,
        weights_signatures: Sequence[Sequence[Sequence[Any]] | None] | None = None,
    ) -> LeMiCaPlan:
        """Check the plan fits a pipeline; return it, or a rescaled copy when only the step count differs.

        ``weights_signatures`` (one `weights_signature` per transformer) are compared with the plan's when both
        exist; a plan without them, or a transformer whose weights could not be read, is not checked for weights.

        Raises:
            PlanMismatchError: another transformer (class, config or weights) or, without ``allow_rescale``,
                another step count. A different scheduler class only warns (:class:`PlanWarning`).
        """
        _require_positive_int(num_inference_steps, "num_inference_steps")
        transformer_classes = _str_tuple(transformer_classes, "transformer_classes")
        config_fingerprints = _str_tuple(config_fingerprints, "config_fingerprints")
        model_matches = (
            transformer_classes == self.transformer_classes and config_fingerprints == self.config_fingerprints
        )
        if model_matches:
            difference = self.weights_difference(weights_signatures)
            if difference is not None:
                raise PlanMismatchError(f"plan was measured on other weights of {difference}; {_MAKE_A_PLAN}")
        steps_match = num_inference_steps == self.num_inference_steps
        if not model_matches or (not steps_match and not allow_rescale):
            ours = _describe_model(self.transformer_classes, self.config_fingerprints)
            theirs = _describe_model(transformer_classes, config_fingerprints)
            advice = _MAKE_A_PLAN if not model_matches else (
                f"{_MAKE_A_PLAN} or pass allow_rescale=True to stretch this plan to {num_inference_steps} steps"
            )
            raise PlanMismatchError(
                f"plan was made for {ours} with {self.num_inference_steps} steps; this pipeline is {theirs} with "
                f"{num_inference_steps} steps; {advice}"
            )
        if scheduler_class != self.scheduler_class:
            warnings.warn(
                f"LeMiCa plan was measured with {self.scheduler_class}; this pipeline uses {scheduler_class}, so "
                "the plan's segment errors may not hold",
                PlanWarning,
                stacklevel=2,
            )
        if steps_match:
            return self
        rescaled = self.rescaled(num_inference_steps)
        warnings.warn(
            f"LeMiCa plan measured for {self.num_inference_steps} steps (computing {self.budget}: "
            f"{list(self.computed_steps)}) was rescaled to {num_inference_steps} steps (computing {rescaled.budget}: "
            f"{list(rescaled.computed_steps)}); its errors were not measured at this step count, {_MAKE_A_PLAN} "
            "for a measured one",
            PlanWarning,
            stacklevel=2,
        )
        return rescaled

    def weights_difference(self, weights_signatures: Sequence[Sequence[Sequence[Any]] | None] | None) -> str | None:
        """None when a pipeline's weights signatures (one per transformer) match the plan's, or either side has
        none to compare; else which transformer differs and how, e.g. ``WanTransformer3DModel (plan vs this
        pipeline: RMS of blocks.0.ffn.net.0.proj.weight is 0.0361 vs 0.0379)``."""
        if self.weights_signatures is None or weights_signatures is None:
            return None
        if len(weights_signatures) != len(self.weights_signatures):
            raise ValueError(f"one weights signature per transformer is needed: the plan has "
                             f"{len(self.weights_signatures)}, got {len(weights_signatures)}")
        first = first_transformer_difference(self.weights_signatures, weights_signatures)
        if first is None:
            return None
        index, difference = first
        count = len(self.transformer_classes)
        which = f" (transformer {index + 1} of {count})" if count > 1 else ""
        return f"{self.transformer_classes[index]}{which} (plan vs this pipeline: {difference})"

    def rescaled_budget(self, num_inference_steps: int) -> int:
        """How many steps this plan computes when rescaled to ``num_inference_steps``: the same share, rounded
        half up, at least 1."""
        _require_positive_int(num_inference_steps, "num_inference_steps")
        if num_inference_steps == self.num_inference_steps:
            return self.budget
        return min(num_inference_steps,
                   max(1, _round_half_up(self.budget * num_inference_steps, self.num_inference_steps)))

    def rescaled(self, num_inference_steps: int) -> LeMiCaPlan:
        """This plan stretched to another step count; the result has no measured segments.

        The share of computed steps stays the same (``round(budget * new / old)``, at least 1), and so does their
        distribution over time: read the old plan as a piecewise-linear curve from "k-th computed step" to its
        time (ending at the end of the run), and place the new plan's k-th computed step where that curve is at
        the same fraction of the budget, scaled to the new step count and rounded. Step 0 stays 0. When rounding
        merges steps, the longest reuse run is split at its middle until the count is reached.
        """
        old, new = self.num_inference_steps, num_inference_steps
        target = self.rescaled_budget(new)
        if new == old:
            return self
        curve = [*self.computed_steps, old]
        steps = set()
        for k in range(target):
            index = Fraction(k * self.budget, target)  # < budget, so curve[whole + 1] exists
            whole = math.floor(index)
            time = curve[whole] + (index - whole) * (curve[whole + 1] - curve[whole])
            steps.add(min(new - 1, math.floor(time * new / old + Fraction(1, 2))))
        steps = sorted(steps)
        while len(steps) < target:  # target <= new, so a run of two or more steps remains to split
            ends = [*steps[1:], new]
            start, end = max(zip(steps, ends), key=lambda pair: pair[1] - pair[0])  # first longest run on ties
            steps.insert(steps.index(start) + 1, start + (end - start) // 2)
        return dataclasses.replace(
            self,
            num_inference_steps=new,
            computed_steps=tuple(steps),
            error_metric=None,
            segments=(),
            rescaled_from=self.rescaled_from if self.rescaled_from is not None else old,
        )


# --- helpers ---------------------------------------------------------------------------------------------------


def _round_half_up(numerator: int, denominator: int) -> int:
    """``round(numerator / denominator)`` with halves rounded up, in exact integer arithmetic."""
    return (2 * numerator + denominator) // (2 * denominator)


def _describe_model(classes: Sequence[str], fingerprints: Sequence[str]) -> str:
    pairs = [f"{name} {fingerprint}" for name, fingerprint in zip(classes, fingerprints)]
    extra = [f"{name} (no fingerprint)" for name in list(classes)[len(pairs):]]
    extra += [f"(no class) {fingerprint}" for fingerprint in list(fingerprints)[len(pairs):]]
    return " + ".join(pairs + extra) or "no transformer"


def _check_weights_signatures(signatures: Any, num_transformers: int) -> tuple:
    if isinstance(signatures, (str, bytes)) or not isinstance(signatures, Sequence):
        raise ValueError(f"weights_signatures must be a list with one entry per transformer, got {signatures!r}")
    if len(signatures) != num_transformers:
        raise ValueError(f"one weights signature per transformer is needed: {num_transformers} classes, "
                         f"{len(signatures)} signatures")
    return tuple(None if signature is None else checked_signature(signature, f"weights_signatures[{index}]")
                 for index, signature in enumerate(signatures))


def _arrows(pairs: Sequence[tuple[int, int]]) -> str:
    return "[" + ", ".join(f"{start}->{end}" for start, end in pairs) + "]"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _require_str(value: Any, name: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _str_tuple(values: Any, name: str) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {values!r}")
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"{name}[{index}] must be a string, got {value!r}")
    return tuple(values)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _require_positive_int(value: Any, name: str) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_computed_steps(steps: Any, num_steps: int) -> tuple[int, ...]:
    if isinstance(steps, str) or not isinstance(steps, Sequence) or not all(_is_int(step) for step in steps):
        raise ValueError(f"computed_steps must be a list of integers, got {steps!r}")
    steps = tuple(int(step) for step in steps)
    if not steps or steps[0] != 0:
        raise ValueError(f"computed_steps must start at step 0 (the first step is always computed), got {list(steps)}")
    if any(later <= earlier for earlier, later in zip(steps, steps[1:])):
        raise ValueError(f"computed_steps must be sorted and without repeats, got {list(steps)}")
    if steps[-1] >= num_steps:
        raise ValueError(
            f"computed_steps must lie in 0..{num_steps - 1} for num_inference_steps={num_steps}, got {list(steps)}"
        )
    return steps


class _JsonObject:
    """Reads the fields of one JSON object, naming the object's path in every complaint."""

    def __init__(self, data: Any, path: str, required: Sequence[str], optional: Sequence[str] = ()):
        if not isinstance(data, dict):
            raise PlanFileError(f"{path} must be a JSON object, got {_json_type(data)}")
        missing = [key for key in required if key not in data]
        if missing:
            raise PlanFileError(f"{path} is missing field(s): {', '.join(missing)}")
        unknown = sorted(set(data) - set(required) - set(optional))
        if unknown:
            raise PlanFileError(f"{path} has unknown field(s): {', '.join(unknown)}")
        self.data, self.path = data, path

    def _where(self, key: str) -> str:
        return key if self.path == "plan" else f"{self.path}.{key}"

    def get(self, key: str, kind: str) -> Any:
        value, where = self.data[key], self._where(key)
        checks = {
            "string": lambda v: isinstance(v, str),
            "integer": _is_int,
            "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "object": lambda v: isinstance(v, dict),
            "list": lambda v: isinstance(v, list),
            "integer or null": lambda v: v is None or _is_int(v),
            "object or null": lambda v: v is None or isinstance(v, dict),
        }
        if not checks[kind](value):
            raise PlanFileError(f"{where} must be {_with_article(kind)}, got {_json_type(value)}")
        return value

    def get_list(self, key: str, item_kind: str) -> list[Any]:
        values, where = self.get(key, "list"), self._where(key)
        for index, value in enumerate(values):
            if item_kind == "string" and not isinstance(value, str) or item_kind == "integer" and not _is_int(value):
                raise PlanFileError(f"{where}[{index}] must be {_with_article(item_kind)}, got {_json_type(value)}")
        return values


# Flat objects and lists shorter than this stay on one line in a plan file; lists of numbers always do.
_INLINE_WIDTH = 100


def _format_json(value: Any, indent: int = 0) -> str:
    """Indented JSON that keeps flat lists and small flat objects on one line, so step lists stay readable."""
    inline = json.dumps(value, allow_nan=False, ensure_ascii=False)
    if not isinstance(value, (dict, list)) or not value:
        return inline
    children = list(value.values()) if isinstance(value, dict) else value
    if indent > 0 and not any(isinstance(child, (dict, list)) for child in children):
        numbers_only = isinstance(value, list) and all(isinstance(child, (int, float)) for child in children)
        if numbers_only or len(inline) <= _INLINE_WIDTH:
            return inline
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [
            f"{pad}{json.dumps(key, ensure_ascii=False)}: {_format_json(item, indent + 2)}"
            for key, item in value.items()
        ]
    else:
        items = [f"{pad}{_format_json(item, indent + 2)}" for item in value]
    opening, closing = ("{", "}") if isinstance(value, dict) else ("[", "]")
    return opening + "\n" + ",\n".join(items) + "\n" + " " * indent + closing


def _with_article(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value}".lower()
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}" if len(value) <= 40 else "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _check_schema(data: Any) -> None:
    if not isinstance(data, dict):
        raise PlanFileError(f"a LeMiCa plan must be a JSON object, got {_json_type(data)}")
    if "schema" not in data:
        raise PlanFileError(f'no "schema" field: not a vidaccel LeMiCa plan (expected "schema": "{SCHEMA}")')
    schema = data["schema"]
    name, _, version = schema.rpartition("/") if isinstance(schema, str) else ("", "", "")
    if name != SCHEMA_NAME:
        raise PlanFileError(f"schema {schema!r} is not a vidaccel LeMiCa plan (expected {SCHEMA!r})")
    if not version.isdigit() or int(version) != SCHEMA_VERSION:
        newer = version.isdigit() and int(version) > SCHEMA_VERSION
        hint = "; it was written by a newer vidaccel, upgrade to read it" if newer else ""
        raise PlanFileError(f"plan schema version {version!r} is not supported (this vidaccel reads {SCHEMA!r}){hint}")


def _parse_plan(data: Any) -> LeMiCaPlan:
    _check_schema(data)
    plan = _JsonObject(data, "plan", [
        "schema", "model", "scheduler", "num_inference_steps", "measured_at", "budget", "computed_steps",
        "errors", "prompts", "rescaled_from", "creation",
    ])
    # weights_signatures is optional: plans made before signatures existed have none and match any weights
    model = _JsonObject(plan.get("model", "object"), "model", ["transformer_classes", "config_fingerprints"],
                        optional=["weights_signatures"])
    scheduler = _JsonObject(plan.get("scheduler", "object"), "scheduler", ["class", "config"])
    size = _JsonObject(plan.get("measured_at", "object"), "measured_at", ["height", "width", "num_frames"])
    creation = _JsonObject(plan.get("creation", "object"), "creation", ["vidaccel_version", "date", "command_line"])
    computed_steps = plan.get_list("computed_steps", "integer")
    budget = plan.get("budget", "integer")
    if budget != len(computed_steps):
        raise PlanFileError(f"budget is {budget} but computed_steps lists {len(computed_steps)} steps")

    error_metric, segments, stored_summary = None, [], {}
    errors_data = plan.get("errors", "object or null")
    if errors_data is not None:
        errors = _JsonObject(errors_data, "errors", ["metric", "max_error", "sum_error", "segments"])
        error_metric = errors.get("metric", "string")
        for index, item in enumerate(errors.get("segments", "list")):
            segment = _JsonObject(item, f"errors.segments[{index}]", ["start", "end", "error"])
            start, end = segment.get("start", "integer"), segment.get("end", "integer")
            segments.append(PlanSegment(start, end, segment.get("error", "number")))
        if not segments:
            raise PlanFileError("errors.segments is empty; use \"errors\": null for a plan without measured errors")
        stored_summary = {key: errors.get(key, "number") for key in ("max_error", "sum_error")}

    result = LeMiCaPlan(
        transformer_classes=tuple(model.get_list("transformer_classes", "string")),
        config_fingerprints=tuple(model.get_list("config_fingerprints", "string")),
        scheduler_class=scheduler.get("class", "string"),
        scheduler_config=scheduler.get("config", "object"),
        num_inference_steps=plan.get("num_inference_steps", "integer"),
        height=size.get("height", "integer"),
        width=size.get("width", "integer"),
        num_frames=size.get("num_frames", "integer"),
        computed_steps=tuple(computed_steps),
        error_metric=error_metric,
        segments=tuple(segments),
        prompts=tuple(plan.get_list("prompts", "string")),
        creation=PlanCreation(
            vidaccel_version=creation.get("vidaccel_version", "string"),
            date=creation.get("date", "string"),
            command_line=tuple(creation.get_list("command_line", "string")),
        ),
        rescaled_from=plan.get("rescaled_from", "integer or null"),
        weights_signatures=model.get("weights_signatures", "list") if "weights_signatures" in model.data else None,
    )
    for key, stored in stored_summary.items():  # written for readers; a hand edit must keep them consistent
        value = getattr(result, key)
        if not math.isclose(stored, value, rel_tol=1e-9, abs_tol=1e-12):
            raise PlanFileError(f"errors.{key} is {stored!r} but the segments give {value!r}")
    return result
