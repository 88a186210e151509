"""LeMiCa offline planning: dense trajectories, replay, segment measurement, error DAG, lexicographic-minimax
solver, plan files (with weights signatures), and `make_plans` tying them together.

The pipeline-side names (trajectories, replay, measurement, planner) load on first use: they import vidaccel's
core and its LeMiCa runtime, which itself imports `plan_file` from here, so importing them eagerly would be circular.
"""

import importlib

from .dag import ERROR_ATTR, build_error_dag, feasible_budget_range
from .plan_file import (
    SCHEMA,
    LeMiCaPlan,
    PlanCreation,
    PlanFileError,
    PlanMismatchError,
    PlanWarning,
    config_fingerprint,
)
from .solver import (
    PlanSegment,
    PlanSolution,
    brute_force_lexicographic_minimax,
    feasible_budgets,
    solve_lexicographic_minimax,
)
from .weights_signature import signature_difference, weights_signature, weights_signatures

# name -> submodule, loaded on first access
_LAZY = {
    **dict.fromkeys(
        ("DenseTrajectory", "PromptRun", "load_prompts", "prompt_runs", "record_trajectories", "record_trajectory",
         "DEFAULT_PROMPTS_PATH", "setting_differences"),
        "trajectories",
    ),
    **dict.fromkeys(("Replayer", "ReplayHook"), "replay"),
    **dict.fromkeys(
        ("CheckpointMismatchError", "ERROR_METRICS", "EdgeMeasurements", "candidate_edges", "measure_edge",
         "measure_edges", "segment_computed_steps"),
        "measure",
    ),
    **dict.fromkeys(("PlannedBudget", "make_plans", "summary_table", "write_plans"), "planner"),
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "ERROR_ATTR",
    "SCHEMA",
    "LeMiCaPlan",
    "PlanCreation",
    "PlanFileError",
    "PlanMismatchError",
    "PlanWarning",
    "PlanSegment",
    "PlanSolution",
    "brute_force_lexicographic_minimax",
    "build_error_dag",
    "config_fingerprint",
    "feasible_budget_range",
    "feasible_budgets",
    "signature_difference",
    "solve_lexicographic_minimax",
    "weights_signature",
    "weights_signatures",
]
