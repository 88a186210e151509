"""LeMiCa offline planning: error DAG, lexicographic-minimax solver and plan files."""

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

__all__ = [
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
    "solve_lexicographic_minimax",
]
