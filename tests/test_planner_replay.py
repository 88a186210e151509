"""LeMiCa planner, pipeline side: dense trajectories and their replay (exact, cheap, leaving no trace)."""

import dataclasses
import json

import pytest
import torch

import vidaccel
from vidaccel.offline_planner.replay import Replayer, replay
from vidaccel.offline_planner.trajectories import (
    DEFAULT_PROMPTS_PATH,
    DenseTrajectory,
    PromptRun,
    load_prompts,
    prompt_runs,
    record_trajectories,
    record_trajectory,
)
from vidaccel.testing import tiny_call_kwargs

STEPS = 6


def planner_kwargs(kind, **overrides):
    """tiny_call_kwargs without the arguments the planner sets itself."""
    kwargs = tiny_call_kwargs(kind, steps=STEPS, **overrides)
    for key in ("prompt", "generator", "num_inference_steps", "output_type"):
        kwargs.pop(key)
    return kwargs


class BlockCalls:
    """Counts calls of the first transformer block of every transformer: real transformer work."""

    def __init__(self, pipe):
        self.count = 0
        self._handles = [
            model.blocks[0].register_forward_pre_hook(self._hook) if hasattr(model, "blocks")
            else model.transformer_blocks[0].register_forward_pre_hook(self._hook)
            for model in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None))
            if model is not None
        ]

    def _hook(self, module, args):
        self.count += 1

    def close(self):
        for handle in self._handles:
            handle.remove()


def module_state(pipe):
    """What planner hooks may touch: per transformer module its hook registry and instance-level forward."""
    state = {}
    for component in ("transformer", "transformer_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            state[component, name] = (
                tuple(registry._hook_order) if registry is not None else None, module.__dict__.get("forward")
            )
    state["progress"] = pipe.__dict__.get("_progress_bar_config", "unset")
    return state


@pytest.mark.parametrize("kind", ["wan", "wan2.2", "hunyuan", "cogvideox"])
def test_replay_reproduces_dense_latent_bitwise(kind, tiny_pipelines):
    pipe = tiny_pipelines[kind]
    kwargs = planner_kwargs(kind)
    trajectory = record_trajectory(pipe, PromptRun("a red circle moves left", 7), STEPS, kwargs)
    branches = {branch for _, branch in trajectory.outputs}
    assert set(trajectory.outputs) == {(step, branch) for step in range(STEPS) for branch in branches}

    before = module_state(pipe)
    blocks = BlockCalls(pipe)
    try:
        with Replayer(pipe) as replayer:
            for until in (3, STEPS):  # (replaying nothing is the dense run: see the zero-skip segment test)
                blocks.count = 0
                latent, video = replayer.run(trajectory, until, kwargs)
                assert video is None
                assert torch.equal(latent, trajectory.final_latent), f"replay from step {until} is not exact"
                assert replayer.replayed_calls == until * len(branches)
                # only the steps from `until` on run the transformer's blocks
                assert blocks.count == (STEPS - until) * len(branches)
    finally:
        blocks.close()
    assert module_state(pipe) == before


def test_replay_differs_from_dense_when_the_recording_is_altered(tiny_pipelines):
    """Replay really feeds the recording to the scheduler: change one recorded output and the result moves."""
    pipe, kwargs = tiny_pipelines["wan"], planner_kwargs("wan")
    trajectory = record_trajectory(pipe, PromptRun("a blue square", 1), STEPS, kwargs)
    trajectory.outputs[2, "cond"] = trajectory.outputs[2, "cond"] + 0.1
    altered, _ = replay(pipe, trajectory, 3, kwargs)
    assert not torch.equal(altered, trajectory.final_latent)


def test_replay_refuses_other_call_arguments_and_restores_pipeline(tiny_pipelines):
    pipe, kwargs = tiny_pipelines["wan"], planner_kwargs("wan")
    trajectory = record_trajectory(pipe, PromptRun("a cat", 0), STEPS, kwargs)
    before = module_state(pipe)
    with pytest.raises(ValueError, match="another model, scheduler"):
        replay(pipe, trajectory, 2, {**kwargs, "guidance_scale": 3.0})
    with pytest.raises(ValueError, match="replay_until"):
        replay(pipe, trajectory, STEPS + 1, kwargs)
    retrained = [[name, value * 1.05] for name, value in trajectory.setting["weights_signatures"][0]]
    foreign = dataclasses.replace(trajectory, setting={**trajectory.setting, "weights_signatures": [retrained]})
    with pytest.raises(ValueError, match="another model, .*weights_signatures: other weights in transformer 1"):
        replay(pipe, foreign, 2, kwargs)
    assert module_state(pipe) == before
    assert vidaccel.active_handle(pipe) is None
    # a trajectory recorded before weights signatures existed carries none, and still replays
    older = dataclasses.replace(trajectory, setting={key: value for key, value in trajectory.setting.items()
                                                     if key != "weights_signatures"})
    assert torch.equal(replay(pipe, older, 2, kwargs)[0], trajectory.final_latent)


def test_planner_refuses_accelerated_pipeline_and_reserved_arguments(tiny_pipelines):
    pipe, kwargs = tiny_pipelines["wan"], planner_kwargs("wan")
    with vidaccel.apply(pipe, "dense"):
        with pytest.raises(RuntimeError, match="handle.remove"):
            record_trajectory(pipe, PromptRun("a cat", 0), STEPS, kwargs)
    with pytest.raises(ValueError, match="must not set generator, num_inference_steps, output_type, prompt"):
        record_trajectory(pipe, PromptRun("a cat", 0), STEPS, tiny_call_kwargs("wan"))


def test_trajectory_files_round_trip_and_cache(tiny_pipelines, tmp_path, perturb_weights):
    pipe, kwargs = tiny_pipelines["cogvideox"], planner_kwargs("cogvideox")
    runs = prompt_runs(["a red circle", "a green square"], seed=5)
    assert [run.seed for run in runs] == [5, 6]
    first = record_trajectories(pipe, runs, STEPS, kwargs, decode=True, cache_dir=tmp_path, progress=False)
    assert first[0].final_video.shape == (1, 9, 32, 32, 3)

    loaded = DenseTrajectory.load(tmp_path / "trajectory-000.safetensors")
    assert loaded.run == runs[0] and loaded.setting == first[0].setting
    assert list(loaded.outputs) == list(first[0].outputs)
    assert all(torch.equal(loaded.outputs[key], first[0].outputs[key]) for key in loaded.outputs)
    assert torch.equal(loaded.final_latent, first[0].final_latent)
    assert torch.equal(loaded.final_video, first[0].final_video)

    blocks = BlockCalls(pipe)
    try:
        again = record_trajectories(pipe, runs, STEPS, kwargs, decode=True, cache_dir=tmp_path, progress=False)
        assert blocks.count == 0  # both came from the cache
        assert torch.equal(again[1].final_latent, first[1].final_latent)
        record_trajectories(pipe, runs[:1], STEPS, kwargs, decode=False, cache_dir=tmp_path, progress=False)
        assert blocks.count > 0  # a cached trajectory without what is asked for is recorded again
        record_trajectories(pipe, runs, STEPS, kwargs, decode=True, cache_dir=tmp_path, progress=False)
        blocks.count = 0  # both cached and decoded again
        perturb_weights(pipe.transformer, first[1].setting["weights_signatures"][0][-1][0])
        record_trajectories(pipe, runs, STEPS, kwargs, decode=True, cache_dir=tmp_path, progress=False)
        assert blocks.count > 0  # nor is one recorded on other weights
    finally:
        blocks.close()


def test_prompt_files(tmp_path):
    shipped = load_prompts()
    assert load_prompts(DEFAULT_PROMPTS_PATH) == shipped
    assert len(shipped) >= 8 and len(set(shipped)) == len(shipped)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["one", "two"]))
    assert load_prompts(listed) == ["one", "two"]
    for bad in ([], {"prompts": ["ok", ""]}, {"other": ["x"]}, "text"):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="non-empty list"):
            load_prompts(path)
    with pytest.raises(ValueError, match="one string"):
        prompt_runs("a cat")
