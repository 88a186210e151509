"""Measuring the global error of every LeMiCa segment, averaged over prompts, with a resumable checkpoint.

Segment ``i -> j`` (an edge of the error DAG): compute step ``i``, reuse its block-stack residual for steps
``i+1 .. j-1``, compute ``j .. T-1`` fully. Its error is how far the final latent (or decoded video) lands from the
dense one. Steps before ``i`` are replayed from the dense trajectory, so a measurement costs only the steps it
computes; steps ``i+1 .. j-1`` go through vidaccel's LeMiCa runtime with the plan ``{0..i} ∪ {j..T-1}``, so the
measured segment is exactly what the runtime does with a plan containing it (including the runtime's rule that a
transformer with nothing cached yet computes anyway, e.g. Wan 2.2's second expert at its first step).

The checkpoint is a JSON file rewritten (atomically) after every edge; a later call with the same setting, prompts
and seeds measures only the edges it lacks. Edges do not depend on ``max_skip``, so a checkpoint made with a
smaller ``max_skip`` is extended rather than redone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from vidaccel.caching.lemica import LeMiCa
from vidaccel.metrics import relative_l1
from vidaccel.presets import Preset

from .dag import feasible_budget_range
from .replay import Replayer
from .trajectories import DenseTrajectory, PromptRun, generation_setting, setting_differences

EDGES_SCHEMA = "vidaccel.lemica-edges/1"

#: Errors measured per segment (all: lower is better, 0 when the run equals the dense one).
#: ``relative_l1``: mean |dense - test| / mean |dense| of the final latent; ``mean_l1``: mean |dense - test| of the
#: final latent; ``video_mse``: mean squared error of the decoded video in [0, 1] (PSNR = -10 log10(mse)).
LATENT_METRICS = ("relative_l1", "mean_l1")
VIDEO_METRICS = ("video_mse",)
ERROR_METRICS = LATENT_METRICS + VIDEO_METRICS


class CheckpointMismatchError(ValueError):
    """An edge checkpoint was measured with another pipeline, setting, prompts or seeds."""


def candidate_edges(num_steps: int, max_skip: int) -> list[tuple[int, int]]:
    """Every segment that reuses between 1 and ``max_skip`` steps (``j - i - 1``), in (start, end) order.

    Segments reusing nothing (``i -> i+1``) are the dense run itself and have error 0 by construction.
    """
    feasible_budget_range(num_steps, max_skip)  # validates both
    return [
        (start, end)
        for start in range(num_steps)
        for end in range(start + 2, min(start + max_skip + 1, num_steps) + 1)
    ]


def segment_computed_steps(num_steps: int, start: int, end: int) -> tuple[int, ...]:
    """The LeMiCa plan that computes everything except the steps segment ``start -> end`` reuses."""
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"segment {start}->{end} does not fit a {num_steps}-step run")
    return (*range(start + 1), *range(end, num_steps))


def segment_preset(num_steps: int, start: int, end: int) -> Preset:
    return Preset(
        cache=LeMiCa(computed_steps=segment_computed_steps(num_steps, start, end), num_inference_steps=num_steps),
        name=f"lemica-segment-{start}-{end}",
    )


def segment_errors(
    trajectory: DenseTrajectory, final_latent: torch.Tensor, final_video: torch.Tensor | None
) -> dict[str, float]:
    """Every error metric available for one generation against its dense trajectory."""
    dense = trajectory.final_latent.float()
    test = final_latent.to(dense.device).float()
    errors = {
        "relative_l1": relative_l1(dense, test),
        "mean_l1": (dense - test).abs().mean().item(),
    }
    if trajectory.final_video is not None:
        if final_video is None:
            raise ValueError("the dense trajectory has a decoded video but the measured run was not decoded")
        errors["video_mse"] = (trajectory.final_video.double() - final_video.double()).square().mean().item()
    for name, value in errors.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} of {trajectory.run.prompt!r} is {value!r}: the dense final latent is all zeros")
    return errors


@dataclasses.dataclass
class EdgeMeasurements:
    """Per edge ``(start, end)`` and metric, the error of each prompt run (in ``runs`` order)."""

    setting: dict[str, Any]
    runs: tuple[PromptRun, ...]
    errors: dict[tuple[int, int], dict[str, list[float]]] = dataclasses.field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.setting["num_inference_steps"]

    @property
    def metrics(self) -> tuple[str, ...]:
        return ERROR_METRICS if self.setting.get("decode") else LATENT_METRICS

    def mean_errors(self, metric: str = "relative_l1") -> dict[tuple[int, int], float]:
        """Edge -> error averaged over prompts: the weights of the error DAG."""
        if metric not in self.metrics:
            hint = " (decoded-video metrics need trajectories recorded with decode=True)" if metric in ERROR_METRICS else ""
            raise ValueError(f"unknown or unmeasured error metric {metric!r}; measured: {', '.join(self.metrics)}{hint}")
        return {edge: math.fsum(values[metric]) / len(values[metric]) for edge, values in sorted(self.errors.items())}

    def compatible_with(self, other: EdgeMeasurements, ignore: Iterable[str] = ()) -> list[str]:
        """What differs between the conditions of two measurement sets (empty when they can be merged), setting
        keys in ``ignore`` aside."""
        differences = setting_differences(self.setting, other.setting, ignore)
        if self.runs != other.runs:
            differences.append("prompts or seeds differ")
        return differences

    # --- JSON -----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": EDGES_SCHEMA,
            "setting": self.setting,
            "runs": [{"prompt": run.prompt, "seed": run.seed} for run in self.runs],
            "edges": [
                {"start": start, "end": end, **{metric: list(values) for metric, values in errors.items()}}
                for (start, end), errors in sorted(self.errors.items())
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> EdgeMeasurements:
        if not isinstance(data, dict) or data.get("schema") != EDGES_SCHEMA:
            raise ValueError(f"not a LeMiCa edge-measurement file (expected \"schema\": \"{EDGES_SCHEMA}\")")
        runs = tuple(PromptRun(run["prompt"], run["seed"]) for run in data["runs"])
        measurements = cls(setting=data["setting"], runs=runs)
        for item in data["edges"]:
            edge = (item["start"], item["end"])
            errors = {metric: [float(v) for v in item[metric]] for metric in measurements.metrics}
            if any(len(values) != len(runs) for values in errors.values()):
                raise ValueError(f"edge {edge[0]}->{edge[1]} does not have one error per prompt run")
            measurements.errors[edge] = errors
        return measurements

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the checkpoint; atomically replaced, so an interruption never corrupts it."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".lemica-edges-", suffix=".json", dir=directory)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(self.to_dict(), file, indent=1, allow_nan=False)
                file.write("\n")
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EdgeMeasurements:
        with open(path, encoding="utf-8") as file:
            try:
                data = json.load(file)
            except ValueError as error:
                raise ValueError(f"{os.fspath(path)}: not valid JSON ({error})") from None
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{os.fspath(path)}: malformed LeMiCa edge measurements ({error!r})") from None


def _check_trajectories(trajectories: Sequence[DenseTrajectory]) -> tuple[dict[str, Any], bool]:
    if not trajectories:
        raise ValueError("at least one dense trajectory is needed")
    first = trajectories[0]
    decode = first.final_video is not None
    for trajectory in trajectories[1:]:
        if setting_differences(trajectory.setting, first.setting) or (trajectory.final_video is not None) != decode:
            raise ValueError("all dense trajectories must come from the same setting (and all be decoded or none)")
    return first.setting, decode


def measure_edge(
    pipe: Any,
    trajectories: Sequence[DenseTrajectory],
    start: int,
    end: int,
    call_kwargs: Mapping[str, Any],
) -> dict[str, list[float]]:
    """Errors of segment ``start -> end`` for each trajectory (metric -> one value per trajectory)."""
    _, decode = _check_trajectories(trajectories)
    num_steps = trajectories[0].num_inference_steps
    errors: dict[str, list[float]] = {}
    with Replayer(pipe, segment_preset(num_steps, start, end)) as replayer:
        for trajectory in trajectories:
            latent, video = replayer.run(trajectory, start, call_kwargs, decode)
            for metric, value in segment_errors(trajectory, latent, video).items():
                errors.setdefault(metric, []).append(value)
    return errors


def measure_edges(
    pipe: Any,
    trajectories: Sequence[DenseTrajectory],
    edges: Iterable[tuple[int, int]],
    call_kwargs: Mapping[str, Any],
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> EdgeMeasurements:
    """Measure ``edges`` over all trajectories, skipping those already in ``checkpoint``.

    Raises:
        CheckpointMismatchError: the checkpoint was made with another pipeline, setting, prompts or seeds.
    """
    from tqdm.auto import tqdm

    setting, decode = _check_trajectories(trajectories)
    num_steps = trajectories[0].num_inference_steps
    current = generation_setting(pipe, num_steps, call_kwargs)
    differences = setting_differences(current, setting)
    if differences:
        raise ValueError("the dense trajectories were recorded with another pipeline setting than call_kwargs give "
                         f"({'; '.join(differences)})")
    # The pipeline's own setting: trajectories cached before weights signatures existed carry none, the checkpoint
    # written here should.
    measurements = EdgeMeasurements({**current, "decode": decode}, tuple(t.run for t in trajectories))
    if checkpoint is not None and os.path.exists(checkpoint):
        stored = EdgeMeasurements.load(checkpoint)
        differences = measurements.compatible_with(stored)
        if differences:
            raise CheckpointMismatchError(
                f"{os.fspath(checkpoint)} was measured under other conditions ({'; '.join(differences)}); "
                "use another checkpoint path or delete it"
            )
        measurements.errors.update(stored.errors)

    pending = []
    for start, end in edges:
        if not 0 <= start < end <= num_steps:
            raise ValueError(f"edge {start}->{end} does not fit a {num_steps}-step run")
        if (start, end) not in measurements.errors and (start, end) not in pending:
            pending.append((start, end))
    bar = tqdm(pending, desc="LeMiCa segments", unit="edge", disable=not progress)
    for start, end in bar:
        bar.set_postfix_str(f"{start}->{end}")
        measurements.errors[start, end] = measure_edge(pipe, trajectories, start, end, call_kwargs)
        if checkpoint is not None:
            measurements.save(checkpoint)
    return measurements
