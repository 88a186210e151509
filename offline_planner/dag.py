"""The LeMiCa error DAG: one node per denoising step, one edge per "compute here, reuse until there" segment.

Node ``i < T`` means "step ``i`` is computed"; node ``T`` (the number of steps) is the end of the run. Edge
``i -> j`` means: compute step ``i``, reuse its result for steps ``i+1 .. j-1``, compute step ``j`` (or, when
``j == T``, finish the run after reusing through step ``T-1``). Its weight is the measured error that this one
segment causes on the final output. A plan with ``B`` computed steps is a path ``0 -> ... -> T`` with ``B`` edges.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import networkx as nx

#: Edge attribute holding a segment's measured global error.
ERROR_ATTR = "error"

# How many missing edges an error message lists before summarising the rest as a count.
_MISSING_EDGES_SHOWN = 12


def skipped_steps(start: int, end: int) -> int:
    """Number of reused (not computed) steps on the segment ``start -> end``."""
    return end - start - 1


def feasible_budget_range(num_steps: int, max_skip: int | None) -> tuple[int, int]:
    """Smallest and largest number of computed steps a plan can have.

    Each segment covers at most ``max_skip + 1`` steps, so at least ``ceil(T / (max_skip + 1))`` segments are
    needed; computing every step is the most.
    """
    _check_num_steps(num_steps)
    _check_max_skip(max_skip)
    if max_skip is None:
        return 1, num_steps
    return -(-num_steps // (max_skip + 1)), num_steps


def build_error_dag(
    num_steps: int,
    edge_errors: Mapping[tuple[int, int], float],
    max_skip: int | None,
) -> nx.DiGraph:
    """Build the DAG the LeMiCa solver searches.

    Args:
        num_steps: ``T``, the number of denoising steps; nodes are ``0 .. T``.
        edge_errors: measured error per segment ``(i, j)`` with ``0 <= i < j <= T``. Segments that reuse more
            than ``max_skip`` steps are ignored (measurements may cover more than one plan uses). A segment
            ``(i, i+1)`` reuses nothing, so it defaults to error 0 when absent.
        max_skip: the most consecutive reused steps a segment may have; ``None`` means no limit.

    Raises:
        ValueError: on a malformed key, a negative, NaN or infinite error, or when a segment allowed by
            ``max_skip`` has no measurement (the message names the missing segments).
    """
    _check_num_steps(num_steps)
    _check_max_skip(max_skip)
    limit = num_steps if max_skip is None else max_skip

    dag = nx.DiGraph(num_steps=num_steps, max_skip=max_skip)
    dag.add_nodes_from(range(num_steps + 1))
    for key, value in edge_errors.items():
        start, end = _check_edge_key(key, num_steps)
        error = _check_error(key, value)
        if skipped_steps(start, end) <= limit:
            dag.add_edge(start, end, **{ERROR_ATTR: error})

    missing = []
    for start in range(num_steps):
        for end in range(start + 1, min(start + limit + 1, num_steps) + 1):
            if dag.has_edge(start, end):
                continue
            if end == start + 1:
                dag.add_edge(start, end, **{ERROR_ATTR: 0.0})
            else:
                missing.append((start, end))
    if missing:
        shown = ", ".join(f"{i}->{j}" for i, j in missing[:_MISSING_EDGES_SHOWN])
        more = f" and {len(missing) - _MISSING_EDGES_SHOWN} more" if len(missing) > _MISSING_EDGES_SHOWN else ""
        raise ValueError(
            f"{len(missing)} segment(s) allowed by max_skip={max_skip} with num_steps={num_steps} have no "
            f"measured error: {shown}{more}. Measure them or lower max_skip."
        )
    return dag


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")


def _check_max_skip(max_skip: int | None) -> None:
    if max_skip is None:
        return
    if isinstance(max_skip, bool) or not isinstance(max_skip, numbers.Integral) or max_skip < 0:
        raise ValueError(f"max_skip must be None or a non-negative integer, got {max_skip!r}")


def _check_edge_key(key: object, num_steps: int) -> tuple[int, int]:
    if (
        not isinstance(key, tuple)
        or len(key) != 2
        or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) for k in key)
    ):
        raise ValueError(f"edge key must be a pair of step indices (i, j), got {key!r}")
    start, end = int(key[0]), int(key[1])
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"edge {key!r} is not a segment 0 <= i < j <= num_steps={num_steps}")
    return start, end


def _check_error(key: tuple[int, int], value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"error of edge {key!r} must be a real number, got {value!r}")
    error = float(value)
    if math.isnan(error) or math.isinf(error) or error < 0:
        raise ValueError(f"error of edge {key!r} must be finite and non-negative, got {value!r}")
    return error
