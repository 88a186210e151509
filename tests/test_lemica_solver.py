"""LeMiCa error DAG and lexicographic-minimax solver, checked against brute-force enumeration."""

from __future__ import annotations

import math
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vidaccel.offline_planner import (
    ERROR_ATTR,
    PlanSegment,
    brute_force_lexicographic_minimax,
    build_error_dag,
    feasible_budget_range,
    feasible_budgets,
    solve_lexicographic_minimax,
)


def all_pairs(num_steps: int, error=lambda i, j: float(j - i - 1)) -> dict[tuple[int, int], float]:
    return {(i, j): error(i, j) for i in range(num_steps) for j in range(i + 1, num_steps + 1)}


# --- DAG construction -------------------------------------------------------------------------------------------


def test_dag_has_every_segment_within_max_skip_and_nothing_beyond():
    dag = build_error_dag(6, all_pairs(6), max_skip=2)
    assert sorted(dag.nodes) == list(range(7))
    assert sorted(dag.edges) == [(i, j) for i in range(6) for j in range(i + 1, min(i + 3, 6) + 1)]
    assert dag[1][4][ERROR_ATTR] == 2.0
    assert dag.graph == {"num_steps": 6, "max_skip": 2}


def test_unlimited_skip_keeps_every_segment():
    dag = build_error_dag(5, all_pairs(5), max_skip=None)
    assert dag.number_of_edges() == 5 * 6 // 2
    assert dag.has_edge(0, 5)


def test_consecutive_segment_defaults_to_zero_error_but_a_given_value_is_kept():
    errors = {(0, 2): 1.0, (1, 3): 2.0, (1, 2): 0.125}
    dag = build_error_dag(3, errors, max_skip=1)
    assert dag[0][1][ERROR_ATTR] == 0.0
    assert dag[2][3][ERROR_ATTR] == 0.0
    assert dag[1][2][ERROR_ATTR] == 0.125


def test_missing_segments_are_named():
    errors = all_pairs(5)
    del errors[(1, 3)]
    del errors[(2, 5)]
    with pytest.raises(ValueError, match=r"2 segment\(s\).*1->3, 2->5"):
        build_error_dag(5, errors, max_skip=2)
    # Beyond max_skip nothing is required.
    build_error_dag(5, errors, max_skip=0)


def test_many_missing_segments_are_summarised():
    with pytest.raises(ValueError, match=r"45 segment\(s\).* and 33 more"):
        build_error_dag(10, {}, max_skip=None)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, "0.1", None, True])
def test_bad_error_values_are_rejected(bad):
    errors = all_pairs(3)
    errors[(0, 2)] = bad
    with pytest.raises(ValueError, match=r"edge \(0, 2\)"):
        build_error_dag(3, errors, max_skip=None)


@pytest.mark.parametrize("key", [(2, 2), (3, 1), (0, 4), (-1, 2), (0,), (0.5, 1), "01"])
def test_bad_edge_keys_are_rejected(key):
    errors = all_pairs(3)
    errors[key] = 0.5
    with pytest.raises(ValueError, match="edge"):
        build_error_dag(3, errors, max_skip=None)


@pytest.mark.parametrize(("num_steps", "max_skip"), [(0, None), (True, 1), (2.0, 1), (4, -1), (4, 1.5)])
def test_bad_sizes_are_rejected(num_steps, max_skip):
    with pytest.raises(ValueError, match="num_steps|max_skip"):
        build_error_dag(num_steps, {}, max_skip=max_skip)


# --- Solver on hand-made cases ----------------------------------------------------------------------------------


def test_minimax_prefers_a_smaller_worst_segment_over_a_smaller_sum():
    # Budget 2 on 4 steps: paths 0->k->4. 0->2->4 has sum 2.0 but worst 1.0; 0->1->4 has worst 0.9, sum 2.7.
    errors = {(0, 2): 1.0, (2, 4): 1.0, (0, 1): 0.0, (1, 4): 0.9, (0, 3): 1.5, (3, 4): 0.0}
    errors |= {(1, 2): 0.0, (1, 3): 0.5, (2, 3): 0.0, (0, 4): 5.0}
    solution = solve_lexicographic_minimax(build_error_dag(4, errors, max_skip=None), budget=2)
    assert solution.computed_steps == (0, 1)
    assert solution.segments == (PlanSegment(0, 1, 0.0), PlanSegment(1, 4, 0.9))
    assert solution.error_profile == (0.9, 0.0)
    assert solution.max_error == 0.9
    assert solution.sum_error == 0.9
    assert solution.budget == 2
    assert solution.reused_steps == (2, 3)


def test_equal_worst_segments_are_decided_by_the_next_largest():
    # Both candidate paths have worst 1.0 (a tie in rank); the second-largest edge must decide.
    errors = {(0, 3): 1.0, (3, 6): 0.6, (0, 2): 0.2, (2, 6): 1.0}
    errors |= {(i, j): 9.0 for i in range(6) for j in range(i + 2, 7) if (i, j) not in errors}
    solution = solve_lexicographic_minimax(build_error_dag(6, errors, max_skip=None), budget=2)
    assert solution.computed_steps == (0, 2)
    assert solution.error_profile == (1.0, 0.2)


def test_exact_ties_go_to_the_earliest_computed_steps():
    # Budget 4 on 6 steps: one 3-long segment plus three consecutive ones is best, and it can sit in 4 places.
    errors = all_pairs(6, lambda i, j: {1: 0.0, 3: 1.0}.get(j - i, 7.0))
    solution = solve_lexicographic_minimax(build_error_dag(6, errors, max_skip=None), budget=4)
    assert solution.error_profile == (1.0, 0.0, 0.0, 0.0)
    assert solution.computed_steps == (0, 1, 2, 3)


def test_full_budget_computes_every_step():
    solution = solve_lexicographic_minimax(build_error_dag(7, all_pairs(7), max_skip=3), budget=7)
    assert solution.computed_steps == tuple(range(7))
    assert solution.max_error == 0.0


@pytest.mark.parametrize("budget", [0, 1, 2, 11, 12])
def test_infeasible_budgets_name_the_feasible_range(budget):
    dag = build_error_dag(10, all_pairs(10), max_skip=3)
    with pytest.raises(ValueError, match=r"budget .* infeasible .* one of 3\.\.10"):
        solve_lexicographic_minimax(dag, budget)
    with pytest.raises(ValueError, match=r"one of 3\.\.10"):
        brute_force_lexicographic_minimax(dag, budget)


@pytest.mark.parametrize("budget", [2.0, True, "3"])
def test_non_integer_budgets_are_rejected(budget):
    with pytest.raises(ValueError, match="integer"):
        solve_lexicographic_minimax(build_error_dag(4, all_pairs(4), max_skip=None), budget)


def test_feasible_budgets_match_the_closed_form():
    for num_steps in range(1, 12):
        for max_skip in [None, *range(num_steps + 1)]:
            low, high = feasible_budget_range(num_steps, max_skip)
            dag = build_error_dag(num_steps, all_pairs(num_steps), max_skip)
            assert feasible_budgets(dag) == list(range(low, high + 1)), (num_steps, max_skip)


def test_solver_rejects_a_graph_with_bad_weights():
    dag = build_error_dag(3, all_pairs(3), max_skip=None)
    dag[0][2][ERROR_ATTR] = -1.0
    with pytest.raises(ValueError, match="0->2"):
        solve_lexicographic_minimax(dag, 2)


# --- Solver against brute force ---------------------------------------------------------------------------------

@st.composite
def error_dags(draw):
    num_steps = draw(st.integers(1, 10))
    max_skip = draw(st.one_of(st.none(), st.integers(0, num_steps)))
    pairs = [(i, j) for i in range(num_steps) for j in range(i + 1, num_steps + 1)]
    # Mostly a small palette of values, so ties are common and ranks are dense (where a wrong encoding that lets
    # several small edges outweigh one bigger edge shows up); sometimes arbitrary floats.
    palette = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]), min_size=1, max_size=4, unique=True))
    values = st.sampled_from(palette)
    if draw(st.booleans()):
        values = st.one_of(values, st.floats(0.0, 10.0))
    errors = {pair: draw(values) for pair in pairs}
    # Sometimes leave consecutive segments out to exercise their zero default.
    if draw(st.booleans()):
        errors = {(i, j): e for (i, j), e in errors.items() if j != i + 1}
    return build_error_dag(num_steps, errors, max_skip)


@settings(max_examples=300, deadline=None)
@given(error_dags())
def test_solver_matches_brute_force_for_every_feasible_budget(dag):
    num_steps, max_skip = dag.graph["num_steps"], dag.graph["max_skip"]
    low, high = feasible_budget_range(num_steps, max_skip)
    limit = num_steps if max_skip is None else max_skip
    for budget in range(low, high + 1):
        fast = solve_lexicographic_minimax(dag, budget)
        slow = brute_force_lexicographic_minimax(dag, budget)
        assert fast.error_profile == slow.error_profile
        # Both use the same tie rule, so the whole plan agrees.
        assert fast == slow
        steps = fast.computed_steps
        assert len(steps) == budget and steps[0] == 0 and list(steps) == sorted(set(steps))
        assert all(segment.end - segment.start - 1 <= limit for segment in fast.segments)
        assert fast.segments[-1].end == num_steps
    for budget in (low - 1, high + 1):
        with pytest.raises(ValueError, match="infeasible"):
            solve_lexicographic_minimax(dag, budget)


def test_fifty_steps_every_budget_is_fast():
    rng = random.Random(1234)
    errors = all_pairs(50, lambda i, j: round(rng.random() * (j - i) ** 2, 3))  # rounding makes many ties
    dag = build_error_dag(50, errors, max_skip=50)
    slowest = 0.0
    for budget in range(5, 51):
        start = time.perf_counter()
        solution = solve_lexicographic_minimax(dag, budget)
        slowest = max(slowest, time.perf_counter() - start)
        assert solution.budget == budget
    assert slowest < 1.0, f"slowest budget took {slowest:.3f} s"
