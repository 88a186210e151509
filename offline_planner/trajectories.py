"""Dense reference trajectories for LeMiCa planning.

A trajectory is one seeded dense generation of one prompt, kept as the transformer output (the noise or velocity
prediction) of every (step, CFG branch) call plus the final latent (the latents after the last scheduler step) and,
when a decoded-video metric is wanted, the decoded video. Replaying those outputs (see ``replay.py``) reproduces the
dense latents at any step without running the transformer, which is what makes measuring every segment affordable.

Hooks that record or replay transformer calls must sit *inside* vidaccel's step-context hook, so that the context
already names the step and branch when they run: ``hooks_under_step_context`` attaches them first and applies the
preset (which adds the step-context hook, outermost) afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers.hooks import ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from vidaccel.adapters import for_pipeline
from vidaccel.api import AccelHandle, active_handle, apply
from vidaccel.context import STEP_CONTEXT_HOOK, StepContext
from vidaccel.hooks import HookAttachment
from vidaccel.presets import Preset

from .plan_file import config_fingerprint
from .weights_signature import first_transformer_difference, weights_signatures

TRAJECTORY_SCHEMA = "vidaccel.dense-trajectory/1"
RECORDING_HOOK = "vidaccel.offline_planner.record"
#: The setting key holding one `weights_signature` per transformer.
WEIGHTS_SIGNATURES_KEY = "weights_signatures"

#: Call arguments the planner sets itself for every generation; callers must not pass them.
PLANNER_CALL_ARGUMENTS = (
    "prompt", "generator", "num_inference_steps", "output_type", "return_dict", "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
)


@dataclasses.dataclass(frozen=True)
class PromptRun:
    """One planning generation: a prompt and the seed of its initial noise."""

    prompt: str
    seed: int

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {self.prompt!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


def prompt_runs(prompts: Sequence[str], seed: int = 0) -> tuple[PromptRun, ...]:
    """Prompt ``k`` gets seed ``seed + k``: different noise per prompt, the same noise on every rerun."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string")
    if not prompts:
        raise ValueError("at least one prompt is needed")
    return tuple(PromptRun(prompt, seed + index) for index, prompt in enumerate(prompts))


@dataclasses.dataclass
class DenseTrajectory:
    """The dense generation of one ``PromptRun``.

    ``outputs[(step, branch)]`` is the transformer output of that call, ``final_latent`` the latents after the last
    step, ``final_video`` the decoded video as float32 in [0, 1] (None when not decoded). ``setting`` describes the
    pipeline and call arguments it was made with (see ``generation_setting``).
    """

    run: PromptRun
    num_inference_steps: int
    outputs: dict[tuple[int, str], torch.Tensor]
    final_latent: torch.Tensor
    final_video: torch.Tensor | None
    setting: dict[str, Any]

    def output(self, step: int, branch: str) -> torch.Tensor:
        try:
            return self.outputs[step, branch]
        except KeyError:
            known = sorted({b for _, b in self.outputs})
            raise KeyError(
                f"the dense trajectory of {self.run.prompt!r} has no transformer output for step {step}, branch "
                f"{branch!r} (it has steps 0..{self.num_inference_steps - 1}, branches {known}): the replayed call "
                "differs from the recorded one"
            ) from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file (tensors plus JSON metadata); atomically replaced."""
        from safetensors.torch import save_file

        tensors = {_output_key(step, branch): tensor.contiguous() for (step, branch), tensor in self.outputs.items()}
        tensors["final_latent"] = self.final_latent.contiguous()
        if self.final_video is not None:
            tensors["final_video"] = self.final_video.contiguous()
        metadata = {
            "schema": TRAJECTORY_SCHEMA,
            "prompt": self.run.prompt,
            "seed": self.run.seed,
            "num_inference_steps": self.num_inference_steps,
            "calls": [[step, branch] for step, branch in self.outputs],  # keeps the call order
            "setting": self.setting,
        }
        temporary = f"{os.fspath(path)}.partial"
        save_file(tensors, temporary, metadata={"vidaccel": json.dumps(metadata)})
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DenseTrajectory:
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as file:
            raw = (file.metadata() or {}).get("vidaccel")
            metadata = json.loads(raw) if raw else {}
            if metadata.get("schema") != TRAJECTORY_SCHEMA:
                raise ValueError(f"{os.fspath(path)} is not a vidaccel dense trajectory ({TRAJECTORY_SCHEMA})")
            outputs = {(int(step), str(branch)): file.get_tensor(_output_key(step, branch))
                       for step, branch in metadata["calls"]}
            names = set(file.keys())
            final_video = file.get_tensor("final_video") if "final_video" in names else None
            final_latent = file.get_tensor("final_latent")
        return cls(
            run=PromptRun(metadata["prompt"], metadata["seed"]),
            num_inference_steps=metadata["num_inference_steps"],
            outputs=outputs,
            final_latent=final_latent,
            final_video=final_video,
            setting=metadata["setting"],
        )


def _output_key(step: int, branch: str) -> str:
    return f"outputs/{step}/{branch}"


# --- describing what a measurement was made with --------------------------------------------------------------


def generation_setting(pipe: Any, num_inference_steps: int, call_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON description of everything besides prompt and seed that decides a planning generation.

    Two trajectories or measurements are comparable only when their settings agree (see `setting_differences`):
    model identity (including a signature of each transformer's weights), weights dtype and device type,
    scheduler, step count and the remaining call arguments (images and tensors by hash).
    """
    check_call_kwargs(call_kwargs)
    transformers = for_pipeline(pipe).transformers()
    return {
        "transformer_classes": [type(t).__name__ for t in transformers.values()],
        "config_fingerprints": [config_fingerprint(t.config) for t in transformers.values()],
        WEIGHTS_SIGNATURES_KEY: weights_signatures(transformers.values()),
        "dtypes": [str(next(t.parameters()).dtype).removeprefix("torch.") for t in transformers.values()],
        "device": next(iter(transformers.values())).device.type if transformers else "cpu",
        "scheduler_class": type(pipe.scheduler).__name__,
        "scheduler_fingerprint": config_fingerprint(pipe.scheduler.config),
        "num_inference_steps": num_inference_steps,
        "call": {key: _describe(value, key) for key, value in sorted(call_kwargs.items())},
    }


def setting_differences(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """What differs between two generation settings (empty when they are comparable), keys in ``ignore`` aside.

    Weights signatures are compared with a tolerance (a checkpoint measured on a GPU must match the same weights
    on a CPU, or cast to another dtype), every other key exactly.
    """
    ignore = set(ignore)
    differences = []
    for key in sorted((set(a) | set(b)) - ignore):
        if key == WEIGHTS_SIGNATURES_KEY:
            difference = _weights_difference(a, b)
            if difference is not None:
                differences.append(f"{key}: {difference}")
        elif a.get(key) != b.get(key):
            differences.append(f"{key}: {a.get(key)!r} vs {b.get(key)!r}")
    return differences


def _weights_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    # Trajectories and checkpoints written before signatures existed carry none: nothing to compare, so compatible.
    if WEIGHTS_SIGNATURES_KEY not in a or WEIGHTS_SIGNATURES_KEY not in b:
        return None
    ours, theirs = a[WEIGHTS_SIGNATURES_KEY], b[WEIGHTS_SIGNATURES_KEY]
    if len(ours) != len(theirs):
        return f"signatures of {len(ours)} vs {len(theirs)} transformers"
    first = first_transformer_difference(ours, theirs)
    return None if first is None else f"other weights in transformer {first[0] + 1} ({first[1]})"


def check_call_kwargs(call_kwargs: Mapping[str, Any]) -> None:
    reserved = sorted(set(call_kwargs) & set(PLANNER_CALL_ARGUMENTS))
    if reserved:
        raise ValueError(
            f"call_kwargs must not set {', '.join(reserved)}: the planner sets them for every generation "
            "(prompts and seeds are passed separately)"
        )


def _describe(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(key): _describe(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        array = value.detach().to("cpu").contiguous()
        return {"tensor": list(array.shape), "dtype": str(array.dtype), "sha256": _digest(array.view(torch.uint8))}
    if isinstance(value, np.ndarray):
        return {"array": list(value.shape), "dtype": str(value.dtype), "sha256": _digest(value)}
    if hasattr(value, "tobytes") and hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image
        return {"image": list(value.size), "mode": value.mode, "sha256": _digest(value.tobytes())}
    raise TypeError(
        f"call argument {where} is a {type(value).__name__}, which cannot be recorded with the measurements; "
        "pass numbers, strings, tensors, arrays or images"
    )


def _digest(data: Any) -> str:
    if isinstance(data, torch.Tensor):
        data = data.numpy()
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


# --- running generations with hooks inside the step context ---------------------------------------------------


def step_context_of(module: torch.nn.Module) -> StepContext:
    """The step context vidaccel's hook on ``module`` filled in for the current call."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(STEP_CONTEXT_HOOK) if registry is not None else None
    if hook is None:
        raise RuntimeError(
            "no vidaccel step context on this transformer: planner hooks only work inside hooks_under_step_context"
        )
    return hook.context


def transformer_sample(output: Any) -> torch.Tensor:
    """The prediction tensor of a diffusers transformer's return value (tuple or output object)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        if len(output) != 1 or not isinstance(output[0], torch.Tensor):
            raise TypeError(f"expected the transformer to return one tensor, got a tuple of {len(output)} items")
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the prediction in a transformer output of type {type(output).__name__}")


def as_transformer_output(sample: torch.Tensor, kwargs: Mapping[str, Any]) -> Any:
    """``sample`` in the form the caller asked for with ``return_dict`` (diffusers transformers default to True)."""
    if kwargs.get("return_dict", True):
        return Transformer2DModelOutput(sample=sample)
    return (sample,)


@contextlib.contextmanager
def hooks_under_step_context(
    pipe: Any, make_hook: Callable[[str], ModelHook], name: str, preset: Preset | None = None
) -> Iterator[AccelHandle]:
    """Attach ``make_hook(transformer_name)`` to every transformer, then ``vidaccel.apply(pipe, preset)``.

    Attaching first makes our hooks the inner ones, so vidaccel's step context (and any cache hook of the preset)
    runs before them. On exit everything is removed in reverse order, leaving the pipeline exactly as it was,
    including its progress-bar setting (planning runs many generations, so their bars are hidden).
    """
    if active_handle(pipe) is not None:
        raise RuntimeError(
            "this pipeline is accelerated by vidaccel; call handle.remove() first: plans are measured on the stock "
            "pipeline"
        )
    attachments: list[HookAttachment] = []
    had_bar_config = "_progress_bar_config" in pipe.__dict__
    bar_config = pipe.__dict__.get("_progress_bar_config")
    try:
        for transformer_name, transformer in for_pipeline(pipe).transformers().items():
            attachments.append(HookAttachment(transformer, make_hook(transformer_name), name))
        handle = apply(pipe, preset if preset is not None else Preset(name="lemica-planner"))
        try:
            pipe.set_progress_bar_config(disable=True)
            yield handle
        finally:
            handle.remove()
    finally:
        for attachment in reversed(attachments):
            attachment.detach()
        if had_bar_config:
            pipe._progress_bar_config = bar_config
        else:
            pipe.__dict__.pop("_progress_bar_config", None)


def generate(
    pipe: Any, run: PromptRun, num_inference_steps: int, call_kwargs: Mapping[str, Any], decode: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One seeded generation: (final latent on the CPU, decoded video as float32 in [0, 1] or None).

    The final latent is taken from the step-end callback after the last step, so it is the same tensor whether or
    not the pipeline goes on to decode. Generators live on the CPU so that the noise is the same on every device.
    """
    check_call_kwargs(call_kwargs)
    last = {}

    def keep_latents(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        last["latents"] = tensors["latents"]
        return {}

    kwargs = dict(
        call_kwargs,
        prompt=run.prompt,
        generator=torch.Generator("cpu").manual_seed(run.seed),
        num_inference_steps=num_inference_steps,
        output_type="np" if decode else "latent",
        return_dict=False,
        callback_on_step_end=keep_latents,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    with torch.inference_mode():
        output = pipe(**kwargs)[0]
    if "latents" not in last:
        raise RuntimeError(f"{type(pipe).__name__} never called its step-end callback, so the final latent is unknown")
    latent = last["latents"].detach().to("cpu", copy=True)
    video = torch.from_numpy(np.array(output, dtype=np.float32)) if decode else None
    return latent, video


class RecordingHook(ModelHook):
    """Runs the transformer unchanged and keeps a CPU copy of its output per (step, branch)."""

    def __init__(self, outputs: dict[tuple[int, str], torch.Tensor], storage_device: str | torch.device = "cpu"):
        super().__init__()
        self.outputs = outputs  # shared by the hooks of all transformers of one pipeline (Wan 2.2 has two)
        self.storage_device = storage_device

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = self.fn_ref.original_forward(*args, **kwargs)
        context = step_context_of(module)
        key = (context.step_index, context.branch)
        if key in self.outputs:
            raise RuntimeError(
                f"the transformer ran twice for step {key[0]}, branch {key[1]!r}; LeMiCa planning needs one call per "
                "step and CFG branch"
            )
        self.outputs[key] = transformer_sample(output).detach().to(self.storage_device, copy=True)
        return output


def record_trajectory(
    pipe: Any,
    run: PromptRun,
    num_inference_steps: int,
    call_kwargs: Mapping[str, Any],
    *,
    decode: bool = False,
    storage_device: str | torch.device = "cpu",
) -> DenseTrajectory:
    """Run ``pipe`` dense (stock computation) for ``run`` and keep what replaying and measuring need."""
    setting = generation_setting(pipe, num_inference_steps, call_kwargs)
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    with hooks_under_step_context(pipe, lambda _: RecordingHook(outputs, storage_device), RECORDING_HOOK):
        latent, video = generate(pipe, run, num_inference_steps, call_kwargs, decode)
    steps = {step for step, _ in outputs}
    if steps != set(range(num_inference_steps)):
        raise RuntimeError(
            f"recorded transformer outputs for steps {sorted(steps)}, expected 0..{num_inference_steps - 1}"
        )
    return DenseTrajectory(run, num_inference_steps, outputs, latent, video, setting)


def record_trajectories(
    pipe: Any,
    runs: Sequence[PromptRun],
    num_inference_steps: int,
    call_kwargs: Mapping[str, Any],
    *,
    decode: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    storage_device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[DenseTrajectory]:
    """Dense trajectories for every run, in order.

    With ``cache_dir``, each trajectory is saved there as ``trajectory-<k>.safetensors`` and reloaded on a later
    call when its prompt, seed and setting match (one that does not match is recorded again and overwritten).
    """
    from tqdm.auto import tqdm

    setting = generation_setting(pipe, num_inference_steps, call_kwargs)
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    trajectories = []
    for index, run in enumerate(tqdm(runs, desc="dense trajectories", unit="prompt", disable=not progress)):
        path = os.path.join(cache_dir, f"trajectory-{index:03d}.safetensors") if cache_dir is not None else None
        if path is not None and os.path.exists(path):
            cached = DenseTrajectory.load(path)
            if (cached.run == run and not setting_differences(cached.setting, setting)
                    and (cached.final_video is not None) == decode):
                trajectories.append(cached)
                continue
        trajectory = record_trajectory(
            pipe, run, num_inference_steps, call_kwargs, decode=decode, storage_device=storage_device
        )
        if path is not None:
            trajectory.save(path)
        trajectories.append(trajectory)
    return trajectories


# --- prompt sets ----------------------------------------------------------------------------------------------

DEFAULT_PROMPTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.json")


def load_prompts(path: str | os.PathLike[str] | None = None) -> list[str]:
    """Prompts from a JSON file: a list of strings or an object with a ``"prompts"`` list. Default: the shipped set."""
    path = DEFAULT_PROMPTS_PATH if path is None else path
    with open(path, encoding="utf-8") as file:
        try:
            data = json.load(file)
        except ValueError as error:
            raise ValueError(f"{os.fspath(path)}: not valid JSON ({error})") from None
    prompts = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(
            f"{os.fspath(path)}: expected a non-empty list of non-empty prompt strings, or an object with one under "
            '"prompts"'
        )
    return prompts
