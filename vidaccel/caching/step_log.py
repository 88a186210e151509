"""Which steps a cache method computed and which it served from its cache, per transformer and CFG branch."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class BranchLog:
    """One (transformer, branch) in one generation."""

    computed_steps: list[int] = dataclasses.field(default_factory=list)
    cached_steps: list[int] = dataclasses.field(default_factory=list)

    def record(self, step: int, cached: bool) -> None:
        (self.cached_steps if cached else self.computed_steps).append(step)

    def to_dict(self) -> dict[str, Any]:
        return {"computed_steps": list(self.computed_steps), "cached_steps": list(self.cached_steps),
                "computed": len(self.computed_steps), "cached": len(self.cached_steps)}


class StepLog:
    """Per-generation record of computed and cached steps, plus totals over every generation so far."""

    def __init__(self):
        self.generation = 0
        self.branches: dict[tuple[str, str], BranchLog] = {}
        self.total_computed = 0
        self.total_cached = 0

    def start_generation(self, generation: int) -> None:
        self.generation = generation
        self.branches = {}

    def branch(self, transformer_name: str, branch: str) -> BranchLog:
        return self.branches.setdefault((transformer_name, branch), BranchLog())

    def record(self, transformer_name: str, branch: str, step: int, cached: bool) -> None:
        self.branch(transformer_name, branch).record(step, cached)
        if cached:
            self.total_cached += 1
        else:
            self.total_computed += 1

    def to_dict(self, extra: dict[tuple[str, str], dict[str, Any]] | None = None) -> dict[str, Any]:
        """``{"generation", "computed", "cached", "per_branch": {transformer: {branch: {...}}}, "total_*"}``;
        `extra` adds method-specific fields to a branch's entry."""
        per_branch: dict[str, dict[str, Any]] = {}
        for (transformer_name, branch), log in self.branches.items():
            entry = log.to_dict()
            entry.update((extra or {}).get((transformer_name, branch), {}))
            per_branch.setdefault(transformer_name, {})[branch] = entry
        return {
            "generation": self.generation,
            "computed": sum(len(log.computed_steps) for log in self.branches.values()),
            "cached": sum(len(log.cached_steps) for log in self.branches.values()),
            "per_branch": per_branch,
            "total_computed": self.total_computed,
            "total_cached": self.total_cached,
        }
