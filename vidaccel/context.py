"""Where the denoising loop is, as seen from inside the transformer.

A `StepContextHook` (a diffusers `ModelHook`) sits on every transformer of the pipeline and, before each call,
records the step index, the CFG branch and the token layout into the pipeline's shared `StepContext`. Attention
processors and cache hooks read that object; nothing counts calls.

Step index, in order of preference (none needs a device-to-host sync):
1. `step_index` from diffusers' `cache_context(...)` (Wan 2.1/2.2 text-to-video pass it);
2. the scheduler's own `step_index` (None before the first `scheduler.step` of a generation: then `begin_index`);
3. otherwise the timestep value is looked up in `scheduler.timesteps` (one host sync per transformer call).
A new generation starts when `scheduler.timesteps` is a new tensor (every `set_timesteps` makes one) or the step
index goes backwards.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .layout import TokenLayout

STEP_CONTEXT_HOOK = "vidaccel.step_context"
DEFAULT_BRANCH = "default"


@dataclasses.dataclass
class StepContext:
    """Mutable, per pipeline. Written by the hooks before each transformer call."""

    step_index: int = -1
    num_steps: int = 0
    branch: str = DEFAULT_BRANCH
    generation: int = 0
    transformer_name: str = ""
    layout: TokenLayout | None = None
    batch_size: int = 0
    step_source: str = ""
    calls: int = 0
    # (generation, branch) -> sorted step indices seen; kept small (one generation at a time) for stats and tests
    steps_seen: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    _timesteps_ref: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    _generation_listeners: list[Callable[[int], None]] = dataclasses.field(default_factory=list, repr=False)

    def on_new_generation(self, listener: Callable[[int], None]) -> None:
        """Call `listener(generation)` whenever a new generation starts (methods reset per-run state there)."""
        self._generation_listeners.append(listener)

    def start_generation(self) -> None:
        self.generation += 1
        self.steps_seen = {}
        for listener in self._generation_listeners:
            listener(self.generation)

    def stats(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "transformer_calls": self.calls,
            "step_source": self.step_source,
            "steps_seen": {branch: list(steps) for branch, steps in self.steps_seen.items()},
            "layout": dataclasses.asdict(self.layout) if self.layout is not None else None,
        }


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class StepContextHook(ModelHook):
    """Fills the pipeline's `StepContext` before every call of one transformer."""

    # Stateful so that diffusers' `cache_context(name, ...)` hands us its CacheContext through the StateManager.
    _is_stateful = True

    def __init__(self, context: StepContext, scheduler: Any, transformer_name: str,
                 layout_fn: Callable[[tuple, dict], tuple[TokenLayout, int]],
                 timestep_fn: Callable[[tuple, dict], Any]):
        super().__init__()
        self.context = context
        self.scheduler = scheduler
        self.transformer_name = transformer_name
        self.layout_fn = layout_fn
        self.timestep_fn = timestep_fn
        self.cache_context = StateManager(_NoState)
        self.handle = None  # the AccelHandle that owns this hook (set by vidaccel.apply)

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        ctx = self.context
        cache_ctx = self.cache_context._context
        branch = cache_ctx.name if cache_ctx is not None else DEFAULT_BRANCH
        timesteps = getattr(self.scheduler, "timesteps", None)

        step, source = self._step_index(cache_ctx, self.timestep_fn(args, kwargs), timesteps)
        new_timesteps = timesteps is not None and timesteps is not ctx._timesteps_ref
        went_back = ctx.step_index >= 0 and step < ctx.step_index
        repeated = step in ctx.steps_seen.get(branch, ()) and step == ctx.step_index
        if ctx.calls == 0 or new_timesteps or went_back or repeated:
            ctx._timesteps_ref = timesteps
            ctx.start_generation()

        ctx.step_index = step
        ctx.num_steps = len(timesteps) if timesteps is not None else 0
        if cache_ctx is not None and cache_ctx.num_inference_steps is not None:
            ctx.num_steps = cache_ctx.num_inference_steps
        ctx.branch = branch
        ctx.transformer_name = self.transformer_name
        ctx.layout, ctx.batch_size = self.layout_fn(args, kwargs)
        ctx.step_source = source
        ctx.calls += 1
        ctx.steps_seen.setdefault(branch, []).append(step)
        return args, kwargs

    def _step_index(self, cache_ctx, timestep, timesteps) -> tuple[int, str]:
        if cache_ctx is not None and cache_ctx.step_index is not None:
            return int(cache_ctx.step_index), "cache_context"
        if hasattr(type(self.scheduler), "step_index"):
            index = self.scheduler.step_index
            if index is None:
                index = getattr(self.scheduler, "begin_index", None) or 0
            return int(index), "scheduler"
        if timesteps is None or timestep is None:
            raise RuntimeError(
                f"vidaccel cannot tell the denoising step: {type(self.scheduler).__name__} has no step_index and "
                "no timesteps. Call the transformer inside `cache_context(name, step_index=i)`."
            )
        value = timestep.reshape(-1)[0] if torch.is_tensor(timestep) else torch.tensor(timestep)
        matches = (timesteps.to(value.device) == value).nonzero()
        if matches.numel() == 0:  # host sync, only for schedulers without a step index (e.g. CogVideoX DDIM)
            raise RuntimeError(f"timestep {float(value)} is not in the scheduler's timesteps")
        return int(matches[0, 0]), "timestep_lookup"

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.cache_context.set_context(None)
        return module
