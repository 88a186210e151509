"""Lexicographic-minimax path search on the LeMiCa error DAG.

Among paths ``0 -> T`` with exactly ``budget`` edges (= computed steps), pick the one whose edge errors, sorted in
decreasing order, are lexicographically smallest: the worst segment is as small as possible, then the second
worst, and so on.

Exact method: give every distinct error value a rank (equal errors share a rank, rank 0 is the smallest) and
replace the error by ``(budget + 1) ** rank``. Every candidate path has exactly ``budget`` edges, so a path's sum
of encoded weights is a base-``(budget + 1)`` number whose digits count how many of its edges have each rank, and
no digit can carry. Comparing sums therefore compares those counts from the highest rank down, which is the
lexicographic order of the sorted-descending error lists. A shortest path with exactly ``budget`` edges is found by
dynamic programming over (node, edges left), using Python's exact integers.

Ties between equally good paths go to the lexicographically smallest list of computed steps, so results are
deterministic and the brute-force reference agrees step for step.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers

import networkx as nx

from .dag import ERROR_ATTR


@dataclasses.dataclass(frozen=True)
class PlanSegment:
    """Compute step ``start``, reuse it through step ``end - 1``; ``error`` is the segment's measured error."""

    start: int
    end: int
    error: float


@dataclasses.dataclass(frozen=True)
class PlanSolution:
    """A chosen path: which steps to compute and what each segment costs."""

    num_steps: int
    computed_steps: tuple[int, ...]
    segments: tuple[PlanSegment, ...]
    error_profile: tuple[float, ...]  # segment errors, largest first
    max_error: float
    sum_error: float

    @property
    def budget(self) -> int:
        return len(self.computed_steps)

    @property
    def reused_steps(self) -> tuple[int, ...]:
        computed = set(self.computed_steps)
        return tuple(step for step in range(self.num_steps) if step not in computed)


def solve_lexicographic_minimax(dag: nx.DiGraph, budget: int) -> PlanSolution:
    """Exact lexicographic-minimax plan with exactly ``budget`` computed steps.

    Raises:
        ValueError: when no path has ``budget`` computed steps; the message gives the feasible budgets.
    """
    num_steps, successors = _read_dag(dag)
    _check_budget(num_steps, successors, budget, dag.graph.get("max_skip", "n/a"))

    ranks = {error: rank for rank, error in enumerate(sorted({e for edges in successors for _, e in edges}))}
    base = budget + 1
    encoded = [[(end, base ** ranks[error]) for end, error in edges] for edges in successors]

    # best[k][node]: smallest encoded cost of a path node -> T with exactly k edges (absent when none exists).
    best: list[dict[int, int]] = [{num_steps: 0}]
    for _ in range(budget):
        previous = best[-1]
        layer: dict[int, int] = {}
        for node in range(num_steps):
            for end, weight in encoded[node]:
                rest = previous.get(end)
                if rest is None:
                    continue
                cost = weight + rest
                current = layer.get(node)
                if current is None or cost < current:
                    layer[node] = cost
        best.append(layer)

    # Walk forward taking the smallest next step that stays optimal: the lexicographically smallest plan.
    path = [0]
    for edges_left in range(budget, 0, -1):
        node = path[-1]
        target = best[edges_left][node]
        path.append(
            min(
                end
                for end, weight in encoded[node]
                if best[edges_left - 1].get(end) is not None and weight + best[edges_left - 1][end] == target
            )
        )
    return _solution_from_path(num_steps, path, successors)


def brute_force_lexicographic_minimax(dag: nx.DiGraph, budget: int) -> PlanSolution:
    """Reference solver: enumerate every path with ``budget`` computed steps. Small graphs only.

    Same tie rule as :func:`solve_lexicographic_minimax`: among equal error profiles, the lexicographically
    smallest list of computed steps (combinations come out in that order and only a strictly better profile
    replaces the incumbent).
    """
    num_steps, successors = _read_dag(dag)
    _check_budget(num_steps, successors, budget, dag.graph.get("max_skip", "n/a"))
    errors = {(start, end): error for start, edges in enumerate(successors) for end, error in edges}
    best_profile: tuple[float, ...] | None = None
    best_path: list[int] | None = None
    for middle in itertools.combinations(range(1, num_steps), budget - 1):
        path = [0, *middle, num_steps]
        pairs = list(zip(path, path[1:]))
        if any(pair not in errors for pair in pairs):
            continue
        profile = tuple(sorted((errors[pair] for pair in pairs), reverse=True))
        if best_profile is None or profile < best_profile:
            best_profile, best_path = profile, path
    assert best_path is not None  # _check_budget guarantees a path exists
    return _solution_from_path(num_steps, best_path, successors)


def feasible_budgets(dag: nx.DiGraph) -> list[int]:
    """Every number of computed steps for which some path ``0 -> T`` exists."""
    num_steps, successors = _read_dag(dag)
    return _feasible_budgets(num_steps, successors)


def _feasible_budgets(num_steps: int, successors: list[list[tuple[int, float]]]) -> list[int]:
    # reachable[node] is a bit set: bit k is on when node -> T has a path with exactly k edges.
    reachable = [0] * (num_steps + 1)
    reachable[num_steps] = 1
    for node in range(num_steps - 1, -1, -1):
        for end, _ in successors[node]:
            reachable[node] |= reachable[end] << 1
    return [k for k in range(1, num_steps + 1) if reachable[0] >> k & 1]


def _check_budget(
    num_steps: int, successors: list[list[tuple[int, float]]], budget: int, max_skip: object
) -> None:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise ValueError(f"budget must be an integer number of computed steps, got {budget!r}")
    feasible = _feasible_budgets(num_steps, successors)
    if budget in feasible:
        return
    if not feasible:
        raise ValueError(f"no path from step 0 to the end exists in this DAG (num_steps={num_steps})")
    if feasible == list(range(feasible[0], feasible[-1] + 1)):
        allowed = f"{feasible[0]}..{feasible[-1]}"
    else:
        allowed = ", ".join(map(str, feasible))
    raise ValueError(
        f"budget {budget} is infeasible for num_steps={num_steps}, max_skip={max_skip}: "
        f"the number of computed steps must be one of {allowed}"
    )


def _read_dag(dag: nx.DiGraph) -> tuple[int, list[list[tuple[int, float]]]]:
    """Validate the DAG's shape and return ``T`` and sorted ``(end, error)`` successor lists per node."""
    if not isinstance(dag, nx.DiGraph) or dag.is_multigraph():
        raise TypeError(f"expected a networkx.DiGraph from build_error_dag, got {type(dag).__name__}")
    num_steps = dag.graph.get("num_steps", dag.number_of_nodes() - 1)
    if num_steps < 1 or set(dag.nodes) != set(range(num_steps + 1)):
        raise ValueError(f"DAG nodes must be exactly 0..num_steps with num_steps >= 1 (num_steps={num_steps})")
    successors: list[list[tuple[int, float]]] = [[] for _ in range(num_steps + 1)]
    for start, end, data in dag.edges(data=True):
        if not start < end:
            raise ValueError(f"edge {start}->{end} does not go forward in time")
        error = data.get(ERROR_ATTR)
        if isinstance(error, bool) or not isinstance(error, numbers.Real) or not math.isfinite(error) or error < 0:
            raise ValueError(f"edge {start}->{end} needs a finite non-negative {ERROR_ATTR!r}, got {error!r}")
        successors[start].append((end, float(error)))
    for edges in successors:
        edges.sort()
    return num_steps, successors


def _solution_from_path(num_steps: int, path: list[int], successors: list[list[tuple[int, float]]]) -> PlanSolution:
    errors = {(start, end): error for start, edges in enumerate(successors) for end, error in edges}
    segments = tuple(PlanSegment(start, end, errors[start, end]) for start, end in zip(path, path[1:]))
    profile = tuple(sorted((segment.error for segment in segments), reverse=True))
    return PlanSolution(
        num_steps=num_steps,
        computed_steps=tuple(path[:-1]),
        segments=segments,
        error_profile=profile,
        max_error=profile[0],
        sum_error=math.fsum(profile),
    )
