"""LeMiCa at run time: compute the steps a plan lists, and at every other step replay the whole block stack's
residual from the last computed step of the same transformer and CFG branch.

A plan is either an explicit list (``computed_steps``) or a plan file made offline (``plan``, see
`vidaccel.offline_planner.plan_file`). Every CFG branch follows the same step set. A skipped step still runs the
transformer's embeddings and output head (cheap); its blocks only return their input, after the first one has
added the cached residual. The decision is a set lookup on the host: no device sync at all.

A step the plan skips is computed anyway when its transformer and branch have nothing cached yet in this
generation (e.g. the first step of Wan 2.2's second expert); such steps are listed as ``forced_steps``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from ..method import AccelMethod, MethodConfig
from ..offline_planner.plan_file import (LeMiCaPlan, PlanMismatchError, PlanWarning, config_fingerprint,
                                          parse_plan_filename)
from ..offline_planner.weights_signature import weights_signatures
from .block_skip import SkippableSpan, Streams
from .step_log import StepLog

_HOOK_NAME = "vidaccel.lemica"
PLANS_DIR_ENV_VAR = "VIDACCEL_PLANS_DIR"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class PipelineIdentity(NamedTuple):
    """What a plan is checked against; the field names are `LeMiCaPlan.validate_against`'s keywords."""

    transformer_classes: tuple[str, ...]
    config_fingerprints: tuple[str, ...]
    scheduler_class: str
    weights_signatures: tuple[list | None, ...]  # one `weights_signature` per transformer

    @classmethod
    def of(cls, adapter) -> PipelineIdentity:
        """The identity of an adapter's pipeline; reading the weights signatures costs one host sync."""
        transformers = adapter.transformers().values()
        return cls(
            transformer_classes=tuple(type(t).__name__ for t in transformers),
            config_fingerprints=tuple(config_fingerprint(t.config) for t in transformers),
            scheduler_class=type(adapter.scheduler).__name__,
            weights_signatures=tuple(weights_signatures(transformers)),
        )


@dataclasses.dataclass(frozen=True)
class LeMiCa(MethodConfig):
    """Step plan cache. Give exactly one of ``computed_steps`` (0-based steps to compute; must include 0),
    optionally with the ``num_inference_steps`` they were chosen for; ``plan``: the path of a LeMiCa plan file,
    checked against the pipeline's transformers and step count (``allow_rescale`` stretches a plan made for
    another step count instead of refusing it); or ``budget``: the number of computed steps, taking the plan file
    for that budget from ``plans_dir`` (default: the plans shipped for the reference model; ``num_inference_steps``
    picks among plans made for several step counts). With ``budget`` and ``allow_rescale``, a run with another
    step count uses a plan measured for this model at that step count where the plan folders have one: the fewest
    computed steps whose measured error is no larger than the budget plan's (the same share of steps loses more
    quality at fewer steps); it stretches the plan only where none was measured.

    ``fallback`` (with ``budget``): the cache method to install instead when the plan folders hold no plan with
    that budget for this pipeline's model (a one-time warning says how to make one). The combined presets use it
    so that they run on any model, and run the plan where one exists. Without a fallback a missing or foreign
    plan is an error.

    Plan folders for ``budget``: ``plans_dir`` when given, else the shipped reference plans plus the folder named
    by ``$VIDACCEL_PLANS_DIR`` (where your own `vidaccel plan --out` files go)."""

    role = "cache"
    name = "lemica"

    computed_steps: tuple[int, ...] | None = None
    num_inference_steps: int | None = None
    plan: str | None = None
    allow_rescale: bool = False
    budget: int | None = None
    plans_dir: str | None = None
    fallback: MethodConfig | None = None

    def __post_init__(self):
        given = [name for name in ("computed_steps", "plan", "budget") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("LeMiCa needs exactly one of computed_steps=[...], plan='path/to/plan.json' or "
                             f"budget=<computed steps>; got {', '.join(given) or 'none'}")
        if self.plans_dir is not None and self.budget is None:
            raise ValueError("LeMiCa plans_dir goes with budget=<computed steps>")
        if self.fallback is not None:
            if self.budget is None:
                raise ValueError("LeMiCa fallback goes with budget=<computed steps> (a given plan or step list "
                                 "needs no fallback)")
            if not isinstance(self.fallback, MethodConfig) or self.fallback.role != "cache":
                raise TypeError(f"LeMiCa fallback must be a cache method config such as DBCache(...), got "
                                f"{type(self.fallback).__name__}")
            if isinstance(self.fallback, LeMiCa) and self.fallback.fallback is not None:
                raise ValueError("LeMiCa fallback must not have a fallback of its own")
        if self.budget is not None:
            if not _is_int(self.budget) or self.budget < 1:
                raise ValueError(f"LeMiCa budget must be a positive number of computed steps, got {self.budget!r}")
            if self.num_inference_steps is not None and (not _is_int(self.num_inference_steps)
                                                         or self.num_inference_steps < self.budget):
                raise ValueError(f"LeMiCa num_inference_steps must be an integer >= budget {self.budget}, "
                                 f"got {self.num_inference_steps!r}")
            if self.plans_dir is not None:
                object.__setattr__(self, "plans_dir", os.fspath(self.plans_dir))
        elif self.plan is not None:
            if not isinstance(self.plan, (str, os.PathLike)):
                raise TypeError(f"LeMiCa plan must be the path of a plan file, got {type(self.plan).__name__}")
            object.__setattr__(self, "plan", os.fspath(self.plan))
            if self.num_inference_steps is not None:
                raise ValueError("LeMiCa num_inference_steps goes with computed_steps; a plan file records its own")
        else:
            if self.allow_rescale:
                raise ValueError("LeMiCa allow_rescale applies to plan files, not to an explicit computed_steps list")
            steps = tuple(self.computed_steps) if not isinstance(self.computed_steps, (str, bytes)) else None
            if steps is None or not all(_is_int(step) and step >= 0 for step in steps):
                raise ValueError(f"LeMiCa computed_steps must be step indices >= 0, got {self.computed_steps!r}")
            if len(set(steps)) != len(steps):
                raise ValueError(f"LeMiCa computed_steps has repeated steps: {list(steps)}")
            if 0 not in steps:
                raise ValueError(f"LeMiCa computed_steps must include step 0 (nothing is cached before it), "
                                 f"got {list(steps)}")
            object.__setattr__(self, "computed_steps", tuple(sorted(steps)))
            if self.num_inference_steps is not None:
                if not _is_int(self.num_inference_steps) or self.num_inference_steps < 1:
                    raise ValueError(f"LeMiCa num_inference_steps must be a positive integer, "
                                     f"got {self.num_inference_steps!r}")
                if self.computed_steps[-1] >= self.num_inference_steps:
                    raise ValueError(f"LeMiCa computed_steps {list(self.computed_steps)} reach past the last step "
                                     f"of a {self.num_inference_steps}-step run")

    def build(self) -> "LeMiCaMethod":
        if self.fallback is not None:  # the plan is chosen at install, once the model is known
            return LeMiCaMethod(self, None)
        path = self.plan if self.plan is not None else (self.plan_for_budget() if self.budget is not None else None)
        plan = LeMiCaPlan.from_json(path) if path is not None else None
        return LeMiCaMethod(self, plan)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["fallback"] = self.fallback.to_dict() if self.fallback is not None else None
        return data

    def plan_folders(self) -> list[Path]:
        if self.plans_dir is not None:
            return [Path(self.plans_dir)]
        folders = [shipped_plans_dir()]
        if os.environ.get(PLANS_DIR_ENV_VAR):
            folders.append(Path(os.environ[PLANS_DIR_ENV_VAR]))
        return folders

    def plan_candidates(self) -> tuple[dict[int, list[Path]], list[tuple[int, int]]]:
        """Plan files with this budget by step count (``num_inference_steps`` when given), and every (steps,
        budget) pair found in the plan folders."""
        candidates: dict[int, list[Path]] = {}
        found = []
        for path, steps, budget in self._plan_files():
            found.append((steps, budget))
            if budget == self.budget and self.num_inference_steps in (None, steps):
                candidates.setdefault(steps, []).append(path)
        return candidates, sorted(set(found))

    def _plan_files(self) -> Iterator[tuple[Path, int, int]]:
        """(path, step count, budget) of every plan file in the plan folders, named as `vidaccel plan` writes them."""
        for folder in self.plan_folders():
            for path in sorted(folder.glob("lemica-*steps-*computed.json")):
                parsed = parse_plan_filename(path.name)
                if parsed is not None:
                    yield path, *parsed

    def plan_for_budget(self) -> str:
        """The plan file for ``budget`` in the plan folders (named as `vidaccel plan` writes them)."""
        candidates, found = self.plan_candidates()
        where = ", ".join(map(str, self.plan_folders()))
        if len(candidates) == 1 and len(next(iter(candidates.values()))) == 1:
            return os.fspath(next(iter(candidates.values()))[0])
        available = ", ".join(f"{budget} of {steps} steps" for steps, budget in found) or "none"
        if not candidates:
            wanted = f"budget {self.budget}" + (f" for {self.num_inference_steps} steps"
                                                 if self.num_inference_steps is not None else "")
            raise ValueError(f"no LeMiCa plan with {wanted} in {where} (available: {available}); make one with "
                             f"`vidaccel plan --steps N --budgets {self.budget} --out DIR` and pass plans_dir=DIR")
        if len(candidates) == 1:
            raise ValueError(f"LeMiCa budget {self.budget} has several plan files for "
                             f"{next(iter(candidates))} steps in {where}; pass plans_dir to pick one folder")
        raise ValueError(f"LeMiCa budget {self.budget} has plans for several step counts in {where} "
                         f"({', '.join(map(str, sorted(candidates)))}); pass num_inference_steps to pick one")

    def plan_for_model(self, identity: PipelineIdentity) -> tuple[LeMiCaPlan | None, str]:
        """The plan with this budget made for the model ``identity`` (architecture and weights), or None and why
        not. With plans for several step counts, ``num_inference_steps`` (else the most steps) decides."""
        candidates, _ = self.plan_candidates()
        matching: dict[int, LeMiCaPlan] = {}
        other_weights = ""  # why the first plan for this architecture was refused
        for steps, paths in sorted(candidates.items()):
            for path in paths:
                plan = LeMiCaPlan.from_json(path)
                difference = _model_difference(plan, identity)
                if difference is None:
                    matching.setdefault(steps, plan)
                elif difference and not other_weights:
                    other_weights = f"{os.fspath(path)}: {difference}"
        if matching:
            return matching[max(matching)], ""
        model = ", ".join(f"{name} {fingerprint}" for name, fingerprint in
                          zip(identity.transformer_classes, identity.config_fingerprints))
        folders = ", ".join(map(str, self.plan_folders()))
        if other_weights:
            return None, (f"a LeMiCa plan with budget {self.budget} exists for this architecture ({model}) in "
                          f"{folders}, but it was measured on other weights ({other_weights})")
        return None, f"no LeMiCa plan with budget {self.budget} for this model ({model}) in {folders}"


    def measured_plans(self, identity: PipelineIdentity, num_inference_steps: int) -> list[tuple[LeMiCaPlan, Path]]:
        """Every plan file in the plan folders measured for this model at ``num_inference_steps`` steps (any
        budget; the first folder wins for a budget found in several), fewest computed steps first."""
        found: dict[int, tuple[LeMiCaPlan, Path]] = {}
        for path, steps, budget in self._plan_files():
            if steps != num_inference_steps or budget in found:
                continue
            plan = LeMiCaPlan.from_json(path)
            if _model_difference(plan, identity) is None:
                found[plan.budget] = (plan, path)
        return [found[budget] for budget in sorted(found)]


def _model_difference(plan: LeMiCaPlan, identity: PipelineIdentity) -> str | None:
    """None when ``plan`` was made for the model ``identity``; "" for another architecture; else how the weights
    differ."""
    if (plan.transformer_classes, plan.config_fingerprints) != (identity.transformer_classes,
                                                                identity.config_fingerprints):
        return ""
    return plan.weights_difference(identity.weights_signatures)


def shipped_plans_dir() -> Path:
    """LeMiCa plans shipped with the reference model (measured with `vidaccel plan --reference`, 20 and 50 steps)."""
    from ..reference.pipeline import reference_asset_dir

    return reference_asset_dir() / "lemica"


class LeMiCaMethod(AccelMethod):
    """Installed LeMiCa: one skippable span over all blocks of each transformer."""

    def __init__(self, config: LeMiCa, plan: LeMiCaPlan | None = None):
        self.config = config
        self.plan = plan
        self.context = None
        self._spans: dict[str, SkippableSpan] = {}
        self._pipeline_identity: PipelineIdentity | None = None
        self._steps_for: dict[int, frozenset[int]] = {}  # num_inference_steps -> steps to compute
        self._plan_sources: dict[int, str] = {}  # num_inference_steps -> where its step set came from
        self._residuals: dict[tuple[str, str], Streams] = {}
        self._forced: dict[tuple[str, str], list[int]] = {}
        self.log = StepLog()
        self._fallback = None  # the installed fallback method when no plan fits the model
        self._fallback_reason = ""

    def install(self, adapter) -> None:
        self.context = adapter.context
        transformers = adapter.transformers()
        # Once, here: the weights signatures cost a host sync, which must never happen per step.
        self._pipeline_identity = PipelineIdentity.of(adapter)
        if self.plan is None and self.config.fallback is not None:
            self.plan, reason = self.config.plan_for_model(self._pipeline_identity)
            if self.plan is None:
                self._install_fallback(adapter, reason)
                return
        if self.plan is not None:
            with warnings.catch_warnings():  # only the model is checked now; the run-time check warns once
                warnings.simplefilter("ignore", PlanWarning)
                self.plan.validate_against(**self._pipeline_identity._asdict(),
                                           num_inference_steps=self.plan.num_inference_steps)
        adapter.context.on_new_generation(self._on_new_generation)
        try:
            for name, transformer in transformers.items():
                blocks = adapter.blocks(transformer)
                self._spans[name] = SkippableSpan(self, name, transformer, blocks, 0, len(blocks), _HOOK_NAME)
        except Exception:
            self.uninstall()
            raise

    def _install_fallback(self, adapter, reason: str) -> None:
        fallback = self.config.fallback
        steps = self.config.num_inference_steps or "N"
        warnings.warn(
            f"vidaccel LeMiCa: {reason}; running the fallback {type(fallback).__name__} instead. For the planned "
            f"cache make a plan with `vidaccel plan --model PATH --steps {steps} --budgets {self.config.budget} "
            f"--out DIR` and set {PLANS_DIR_ENV_VAR}=DIR",
            PlanWarning,
            stacklevel=3,
        )
        self._fallback_reason = reason
        self._fallback = fallback.build()
        self._fallback.install(adapter)

    def uninstall(self) -> None:
        if self._fallback is not None:
            self._fallback.uninstall()
        for span in reversed(list(self._spans.values())):
            span.detach()
        self._spans.clear()
        self._residuals.clear()

    def _on_new_generation(self, generation: int) -> None:
        self._residuals.clear()
        self._forced = {}
        self.log.start_generation(generation)

    def steps_to_compute(self, num_steps: int) -> frozenset[int]:
        """The step set for a run of `num_steps` steps; raises PlanMismatchError when the plan does not fit."""
        if num_steps in self._steps_for:
            return self._steps_for[num_steps]
        if num_steps < 1:
            raise RuntimeError("vidaccel LeMiCa cannot tell how many steps this run has (no scheduler timesteps)")
        if self.plan is not None:
            plan = self._measured_plan_for(num_steps)
            if plan is None:
                plan = self.plan.validate_against(**self._pipeline_identity._asdict(), num_inference_steps=num_steps,
                                                  allow_rescale=self.config.allow_rescale)
                self._plan_sources[num_steps] = (
                    f"plan measured for {num_steps} steps" if plan is self.plan else
                    f"stretched from {self.plan.budget} of {self.plan.num_inference_steps} steps (not measured)")
            steps = plan.computed_steps
        else:
            steps = self.config.computed_steps
            planned = self.config.num_inference_steps
            self._plan_sources[num_steps] = "the given computed_steps"
            if planned is not None and planned != num_steps:
                raise PlanMismatchError(
                    f"LeMiCa computed_steps {list(steps)} were chosen for {planned} steps; this run has {num_steps} "
                    "steps. Pass the list for this step count, or a plan file with allow_rescale=True"
                )
            if steps[-1] >= num_steps:
                raise PlanMismatchError(
                    f"LeMiCa computed_steps {list(steps)} reach step {steps[-1]}, but this run has {num_steps} steps "
                    f"(0..{num_steps - 1})"
                )
        self._steps_for[num_steps] = frozenset(steps)
        return self._steps_for[num_steps]

    def _measured_plan_for(self, num_steps: int) -> LeMiCaPlan | None:
        """For a budget plan that may be rescaled: a plan measured for this model at ``num_steps``, which beats
        stretching; None if there is none.

        The same share of computed steps does not give the same quality at another step count (on the reference
        model 12 of 50 steps measured 19 dB, 5 of 20 only 12 dB), so the choice matches the measured error
        instead: the fewest computed steps whose summed segment error (the deviation of the final latent, comparable
        across step counts) is no larger than this plan's; if none is that good, the most accurate one measured.
        Plans without measured errors fall back to the same share of computed steps."""
        config, plan = self.config, self.plan
        if config.budget is None or not config.allow_rescale or num_steps == plan.num_inference_steps:
            return None
        measured = config.measured_plans(self._pipeline_identity, num_steps)
        target = plan.sum_error
        comparable = [] if target is None else [(m, path) for m, path in measured
                                                if m.error_metric == plan.error_metric and m.sum_error is not None]
        reference = f"{plan.budget} of {plan.num_inference_steps} steps"
        if comparable:
            fitting = [(m, path) for m, path in comparable if m.sum_error <= target]
            if fitting:
                chosen, path = fitting[0]
                how = f"error {chosen.sum_error:.3g} <= {target:.3g} of the {reference} plan"
            else:
                chosen, path = min(comparable, key=lambda item: item[0].sum_error)
                how = f"the most accurate measured; error {chosen.sum_error:.3g} > {target:.3g} of the {reference} plan"
        else:
            same_share = [(m, path) for m, path in measured if m.budget == plan.rescaled_budget(num_steps)]
            if not same_share:
                return None
            chosen, path = same_share[0]
            how = f"same share of steps as the {reference} plan"
        self._plan_sources[num_steps] = f"plan measured for {num_steps} steps ({path.name}; {how})"
        return chosen

    # --- SpanOwner --------------------------------------------------------------------------------------------
    def residual_to_replay(self, span: SkippableSpan, span_input: Streams) -> Streams | None:
        ctx = self.context
        step, key = ctx.step_index, (span.transformer_name, ctx.branch)
        planned = step in self.steps_to_compute(ctx.num_steps)
        residual = None if planned else self._residuals.get(key)
        if not planned and residual is None:
            self._forced.setdefault(key, []).append(step)
        self.log.record(span.transformer_name, ctx.branch, step, cached=residual is not None)
        return residual

    def store_residual(self, span: SkippableSpan, residual: Streams) -> None:
        self._residuals[(span.transformer_name, self.context.branch)] = residual

    # --- stats ------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        if self._fallback is not None:
            return {"config": self.config.to_dict(), "plan_steps": {},
                    "fallback": {"method": self.config.fallback.name, "reason": self._fallback_reason},
                    **self._fallback.stats()}
        extra = {key: {"forced_steps": list(steps)} for key, steps in self._forced.items()}
        return {
            "config": self.config.to_dict(),
            "plan_steps": {str(n): sorted(steps) for n, steps in self._steps_for.items()},
            "plan_sources": {str(n): source for n, source in self._plan_sources.items()},
            **self.log.to_dict(extra),
        }
