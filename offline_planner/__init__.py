"""LeMiCa offline planning: error DAG, lexicographic-minimax solver and plan files."""

from .dag import ERROR_ATTR, build_error_dag, feasible_budget_range
from .solver import (
    PlanSegment,
    PlanSolution,
    brute_force_lexicographic_minimax,
    feasible_budgets,
    solve_lexicographic_minimax,
)

__all__ = [
    "ERROR_ATTR",
    "PlanSegment",
    "PlanSolution",
    "brute_force_lexicographic_minimax",
    "build_error_dag",
    "feasible_budget_range",
    "feasible_budgets",
    "solve_lexicographic_minimax",
]
