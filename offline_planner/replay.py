"""Replaying a dense trajectory up to a step, so a measurement pays only for the steps after it.

The scheduler is deterministic given the model outputs, so feeding it the recorded dense transformer outputs for
steps ``< replay_until`` puts the latents exactly where the dense run had them at ``replay_until`` (bitwise on the
same device), without running a single transformer block for those steps. From ``replay_until`` on the pipeline
runs normally, with whatever vidaccel preset (for example a LeMiCa cache) the replayer was opened with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from diffusers.hooks import ModelHook

from vidaccel.presets import Preset

from .trajectories import (
    DenseTrajectory,
    as_transformer_output,
    generate,
    generation_setting,
    hooks_under_step_context,
    setting_differences,
    step_context_of,
)

REPLAY_HOOK = "vidaccel.offline_planner.replay"


class ReplayHook(ModelHook):
    """Returns the recorded output of ``(step, branch)`` for steps before ``replay_until``; runs the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.trajectory: DenseTrajectory | None = None
        self.replay_until = 0
        self.replayed_calls = 0

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        context = step_context_of(module)
        if self.trajectory is None or context.step_index >= self.replay_until:
            return self.fn_ref.original_forward(*args, **kwargs)
        if context.num_steps != self.trajectory.num_inference_steps:
            raise RuntimeError(
                f"replaying a {self.trajectory.num_inference_steps}-step trajectory in a {context.num_steps}-step run"
            )
        recorded = self.trajectory.output(context.step_index, context.branch)
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        device = hidden_states.device if isinstance(hidden_states, torch.Tensor) else recorded.device
        self.replayed_calls += 1
        return as_transformer_output(recorded.to(device, copy=True), kwargs)


class Replayer(contextlib.AbstractContextManager):
    """Replay hooks on every transformer of ``pipe`` plus ``vidaccel.apply(pipe, preset)``, for many runs.

        with Replayer(pipe, preset) as replayer:
            latent, video = replayer.run(trajectory, replay_until=5, call_kwargs=kwargs)

    Leaving the block removes the preset and the hooks and restores the pipeline exactly.
    """

    def __init__(self, pipe: Any, preset: Preset | None = None):
        self.pipe = pipe
        self.preset = preset
        self.hooks: list[ReplayHook] = []
        self.handle = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> Replayer:
        def make_hook(_: str) -> ReplayHook:
            hook = ReplayHook()
            self.hooks.append(hook)
            return hook

        with contextlib.ExitStack() as stack:
            self.handle = stack.enter_context(hooks_under_step_context(self.pipe, make_hook, REPLAY_HOOK, self.preset))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        self.hooks = []
        if stack is not None:
            stack.close()

    def run(
        self,
        trajectory: DenseTrajectory,
        replay_until: int,
        call_kwargs: Mapping[str, Any],
        decode: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Generate ``trajectory``'s prompt and seed, replaying steps ``< replay_until``.

        Returns the final latent (CPU) and, with ``decode``, the decoded video (float32 in [0, 1]).
        """
        if self._stack is None:
            raise RuntimeError("use the Replayer inside a `with` block")
        steps = trajectory.num_inference_steps
        if isinstance(replay_until, bool) or not isinstance(replay_until, int) or not 0 <= replay_until <= steps:
            raise ValueError(f"replay_until must be an integer in 0..{steps}, got {replay_until!r}")
        differences = setting_differences(generation_setting(self.pipe, steps, call_kwargs), trajectory.setting)
        if differences:
            raise ValueError(
                "the trajectory was recorded with another model, scheduler, dtype, device or call arguments than "
                f"this replay uses ({'; '.join(differences)})"
            )
        for hook in self.hooks:
            hook.trajectory, hook.replay_until, hook.replayed_calls = trajectory, replay_until, 0
        try:
            return generate(self.pipe, trajectory.run, steps, call_kwargs, decode)
        finally:
            for hook in self.hooks:
                hook.trajectory = None

    @property
    def replayed_calls(self) -> int:
        """Transformer calls answered from the recording during the last ``run``."""
        return sum(hook.replayed_calls for hook in self.hooks)


def replay(
    pipe: Any,
    trajectory: DenseTrajectory,
    replay_until: int,
    call_kwargs: Mapping[str, Any],
    preset: Preset | None = None,
    decode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One replayed generation (see :class:`Replayer` to make many with the same preset)."""
    with Replayer(pipe, preset) as replayer:
        return replayer.run(trajectory, replay_until, call_kwargs, decode)
