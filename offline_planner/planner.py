"""LeMiCa plans for a pipeline, end to end: dense trajectories -> segment errors -> error DAG -> one plan per budget.

    plans = make_plans(pipe, prompts, num_inference_steps=50, budgets=[10, 15, 20], max_skip=6,
                       call_kwargs=dict(height=480, width=832, num_frames=81), out_dir="plans",
                       checkpoint="plans/edges.json")
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

from vidaccel.adapters import for_pipeline

from .dag import build_error_dag, feasible_budget_range
from .measure import ERROR_METRICS, VIDEO_METRICS, EdgeMeasurements, candidate_edges, measure_edges
from .plan_file import LeMiCaPlan, config_fingerprint, plan_filename
from .solver import solve_lexicographic_minimax
from .trajectories import (
    WEIGHTS_SIGNATURES_KEY,
    check_call_kwargs,
    generation_setting,
    prompt_runs,
    record_trajectories,
)
from .weights_signature import weights_signatures


@dataclasses.dataclass(frozen=True)
class PlannedBudget:
    """One written plan."""

    budget: int
    plan: LeMiCaPlan
    path: str


def generation_size(pipe: Any, call_kwargs: Mapping[str, Any]) -> tuple[int, int, int]:
    """(height, width, num_frames) a plan is measured at: from ``call_kwargs``, else the pipeline's defaults."""
    defaults = inspect.signature(pipe.__call__).parameters
    size = []
    for name in ("height", "width", "num_frames"):
        value = call_kwargs.get(name)
        if value is None and name in defaults:
            value = defaults[name].default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"cannot tell the {name} this plan is measured at ({type(pipe).__name__} has no default); pass "
                f"{name}=... in call_kwargs"
            )
        size.append(value)
    return size[0], size[1], size[2]


def check_budgets(num_inference_steps: int, budgets: Sequence[int], max_skip: int) -> list[int]:
    """Sorted, unique budgets, each feasible with ``max_skip`` (checked before any expensive measurement)."""
    lowest, highest = feasible_budget_range(num_inference_steps, max_skip)
    if isinstance(budgets, (str, int)) or not budgets:
        raise ValueError(f"budgets must be a non-empty list of computed-step counts, got {budgets!r}")
    checked = set()
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, int) or not lowest <= budget <= highest:
            raise ValueError(
                f"budget {budget!r} is infeasible for {num_inference_steps} steps with max_skip={max_skip}: a plan "
                f"computes {lowest}..{highest} steps (raise max_skip for smaller budgets)"
            )
        checked.add(budget)
    return sorted(checked)


def make_plans(
    pipe: Any,
    prompts: Sequence[str],
    num_inference_steps: int,
    budgets: Sequence[int],
    max_skip: int,
    call_kwargs: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    metric: str = "relative_l1",
    trajectory_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    command_line: Sequence[str] | None = None,
) -> list[PlannedBudget]:
    """Measure every segment of up to ``max_skip`` reused steps and write one lexicographic-minimax plan per budget.

    Args:
        pipe: a stock diffusers pipeline vidaccel supports (not currently accelerated).
        prompts: planning prompts; prompt ``k`` uses seed ``seed + k``.
        num_inference_steps: the step count the plans are for.
        budgets: numbers of computed steps, one plan each.
        max_skip: the most consecutive reused steps in a segment.
        call_kwargs: other pipeline arguments (size, frames, guidance...), the same for every generation.
        out_dir: where ``lemica-<T>steps-<B>computed.json`` files are written.
        checkpoint: JSON file of segment errors, written after each segment and resumed from when present.
        metric: the DAG weight, one of ``ERROR_METRICS`` (``video_mse`` decodes every run, which costs more).
        trajectory_dir: keep dense trajectories there (safetensors) and reuse them on a resumed run.
        command_line: recorded in the plans' creation info (default ``sys.argv``).

    Returns:
        The written plans, by increasing budget.
    """
    if metric not in ERROR_METRICS:
        raise ValueError(f"metric must be one of {', '.join(ERROR_METRICS)}, got {metric!r}")
    check_call_kwargs(call_kwargs)
    budgets = check_budgets(num_inference_steps, budgets, max_skip)
    height, width, num_frames = generation_size(pipe, call_kwargs)
    runs = prompt_runs(prompts, seed)
    transformers = for_pipeline(pipe).transformers()

    edges = candidate_edges(num_inference_steps, max_skip)
    measurements = complete_checkpoint(pipe, runs, num_inference_steps, call_kwargs, edges, checkpoint,
                                       decode=metric in VIDEO_METRICS)
    if measurements is None:
        trajectories = record_trajectories(
            pipe, runs, num_inference_steps, call_kwargs,
            decode=metric in VIDEO_METRICS, cache_dir=trajectory_dir, progress=progress,
        )
        measurements = measure_edges(pipe, trajectories, edges, call_kwargs, checkpoint=checkpoint,
                                     progress=progress)
    elif progress:
        print(f"[vidaccel plan] every segment is already in {os.fspath(checkpoint)}: solving without generating")
    return write_plans(
        measurements, budgets, max_skip, out_dir, metric=metric,
        transformer_classes=[type(t).__name__ for t in transformers.values()],
        config_fingerprints=[config_fingerprint(t.config) for t in transformers.values()],
        # The pipeline's own: a reused checkpoint matched them (within tolerance) or predates signatures.
        weights_signatures=weights_signatures(transformers.values()),
        scheduler_class=type(pipe.scheduler).__name__,
        scheduler_config=dict(pipe.scheduler.config),
        size=(height, width, num_frames),
        command_line=command_line,
    )


# Where the edge errors were measured does not change what they are: a finished checkpoint made on a GPU can be
# re-solved for other budgets on a CPU. (Weights signatures are compared with a tolerance that covers the device.)
_SETTING_KEYS_FREE_ON_REUSE = ("device",)


def complete_checkpoint(
    pipe: Any,
    runs: Sequence[Any],
    num_inference_steps: int,
    call_kwargs: Mapping[str, Any],
    edges: Sequence[tuple[int, int]],
    checkpoint: str | os.PathLike[str] | None,
    *,
    decode: bool,
) -> EdgeMeasurements | None:
    """The checkpoint's measurements when they already hold every edge for this pipeline, setting, prompts and
    seeds (device aside), else None (then the planner generates and measures what is missing)."""
    if checkpoint is None or not os.path.exists(checkpoint):
        return None
    stored = EdgeMeasurements.load(checkpoint)
    wanted = EdgeMeasurements({**generation_setting(pipe, num_inference_steps, call_kwargs), "decode": decode},
                              tuple(runs))
    if wanted.compatible_with(stored, ignore=_SETTING_KEYS_FREE_ON_REUSE) or any(
            edge not in stored.errors for edge in edges):
        return None
    return stored


def write_plans(
    measurements: EdgeMeasurements,
    budgets: Sequence[int],
    max_skip: int,
    out_dir: str | os.PathLike[str],
    *,
    metric: str,
    transformer_classes: Sequence[str],
    config_fingerprints: Sequence[str],
    scheduler_class: str,
    scheduler_config: Mapping[str, Any],
    size: tuple[int, int, int],
    command_line: Sequence[str] | None = None,
    weights_signatures: Sequence[Any] | None = None,
) -> list[PlannedBudget]:
    """Solve the error DAG of ``measurements`` for each budget and write the plan files.

    The plans carry ``weights_signatures`` (one `weights_signature` per transformer), by default those of the
    weights the measurements were made on (none for a checkpoint older than signatures).
    """
    if weights_signatures is None:
        weights_signatures = measurements.setting.get(WEIGHTS_SIGNATURES_KEY)
    num_steps = measurements.num_steps
    dag = build_error_dag(num_steps, measurements.mean_errors(metric), max_skip)
    os.makedirs(out_dir, exist_ok=True)
    height, width, num_frames = size
    written = []
    for budget in check_budgets(num_steps, budgets, max_skip):
        solution = solve_lexicographic_minimax(dag, budget)
        plan = LeMiCaPlan.from_solution(
            solution,
            transformer_classes=transformer_classes,
            config_fingerprints=config_fingerprints,
            scheduler_class=scheduler_class,
            scheduler_config=scheduler_config,
            height=height,
            width=width,
            num_frames=num_frames,
            error_metric=metric,
            prompts=[run.prompt for run in measurements.runs],
            command_line=command_line,
            weights_signatures=weights_signatures,
        )
        path = os.path.join(os.fspath(out_dir), plan_filename(num_steps, budget))
        plan.to_json(path)
        written.append(PlannedBudget(budget, plan, path))
    return written


def summary_table(planned: Sequence[PlannedBudget]) -> str:
    """A plain-text table: budget, computed steps, largest segment error, file."""
    rows = [("budget", "computed steps", "max edge error", "file")]
    for item in planned:
        error = item.plan.max_error
        rows.append((
            f"{item.budget}/{item.plan.num_inference_steps}",
            " ".join(map(str, item.plan.computed_steps)),
            "-" if error is None else f"{error:.4g}",
            os.path.basename(item.path),
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
