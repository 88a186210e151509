"""LeMiCa planner end to end: make_plans writes plan files that load, validate and run; `vidaccel plan` on tiny
pipelines."""

import argparse
import sys

import pytest
import torch

import vidaccel
from vidaccel.caching import LeMiCa
from vidaccel.commands import plan as plan_command
from vidaccel.offline_planner import (
    EdgeMeasurements,
    LeMiCaPlan,
    PlanMismatchError,
    build_error_dag,
    brute_force_lexicographic_minimax,
    config_fingerprint,
    make_plans,
)
from vidaccel.offline_planner.planner import plan_filename, summary_table
from vidaccel.offline_planner.weights_signature import weights_signature
from vidaccel.testing import tiny_call_kwargs, tiny_pipeline

STEPS = 6


def planner_kwargs(kind):
    kwargs = tiny_call_kwargs(kind, steps=STEPS)
    for key in ("prompt", "generator", "num_inference_steps", "output_type"):
        kwargs.pop(key)
    return kwargs


@pytest.fixture(scope="module")
def small_wan():
    return tiny_pipeline("wan", num_layers=1)


def identity(pipe):
    return ([type(pipe.transformer).__name__], [config_fingerprint(pipe.transformer.config)],
            type(pipe.scheduler).__name__)


def signatures(pipe):
    return [weights_signature(pipe.transformer)]


def test_make_plans_writes_valid_optimal_plans(small_wan, tmp_path):
    pipe, kwargs = small_wan, planner_kwargs("wan")
    prompts = ["a red circle moves left", "a green square runs up"]
    checkpoint = tmp_path / "edges.json"
    planned = make_plans(pipe, prompts, STEPS, [4, 2, 3], 2, kwargs, tmp_path / "plans", checkpoint, progress=False)
    assert [item.budget for item in planned] == [2, 3, 4]

    measurements = EdgeMeasurements.load(checkpoint)
    dag = build_error_dag(STEPS, measurements.mean_errors("relative_l1"), 2)
    for item in planned:
        assert item.path == str(tmp_path / "plans" / plan_filename(STEPS, item.budget))
        plan = LeMiCaPlan.from_json(item.path)
        assert plan == item.plan
        assert plan.budget == item.budget and plan.num_inference_steps == STEPS
        assert (plan.height, plan.width, plan.num_frames) == (32, 32, 9)
        assert plan.prompts == tuple(prompts) and plan.error_metric == "relative_l1"
        assert plan.scheduler_class == "UniPCMultistepScheduler"
        assert plan.scheduler_config["flow_shift"] == 3.0
        assert plan.weights_signatures == tuple(tuple(map(tuple, signature)) for signature in signatures(pipe))
        # the plan's segments are the measured prompt-averaged errors of the best path
        best = brute_force_lexicographic_minimax(dag, item.budget)
        assert plan.computed_steps == best.computed_steps
        assert [s.error for s in plan.segments] == [s.error for s in best.segments]
        assert plan.validate_against(*identity(pipe), STEPS, weights_signatures=signatures(pipe)) is plan
        with pytest.raises(PlanMismatchError, match="8 steps"):
            plan.validate_against(*identity(pipe), 8)

    other = tiny_pipeline("wan", num_layers=2)  # another model configuration
    with pytest.raises(PlanMismatchError):
        planned[0].plan.validate_against(*identity(other), STEPS)

    # the runtime runs the written plan: only its computed steps run the blocks' layers
    calls = []
    hook = pipe.transformer.blocks[0].ffn.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(plan=planned[1].path))):
            call = tiny_call_kwargs("wan", steps=STEPS)
            call["output_type"] = "latent"
            latents = pipe(**call).frames
    finally:
        hook.remove()
    assert torch.isfinite(latents).all()
    assert len(calls) == 2 * planned[1].budget  # cond and uncond at each computed step


def test_finished_checkpoint_is_solved_again_without_generating(small_wan, tmp_path, monkeypatch):
    from vidaccel.offline_planner import planner

    pipe, kwargs = small_wan, planner_kwargs("wan")
    prompts = ["a red circle moves left"]
    checkpoint = tmp_path / "edges.json"
    first = make_plans(pipe, prompts, STEPS, [3], 2, kwargs, tmp_path / "a", checkpoint, progress=False)
    # measured on another device: the errors still hold, so a finished checkpoint is re-solved as it is
    data = EdgeMeasurements.load(checkpoint).to_dict()
    data["setting"]["device"] = "cuda"
    EdgeMeasurements.from_dict(data).save(checkpoint)

    def no_generation(*args, **kwargs):
        raise AssertionError("a finished checkpoint must not generate again")

    monkeypatch.setattr(planner, "record_trajectories", no_generation)
    again = make_plans(pipe, prompts, STEPS, [3, 4], 2, kwargs, tmp_path / "b", checkpoint, progress=False)
    assert [item.budget for item in again] == [3, 4]
    assert again[0].plan.computed_steps == first[0].plan.computed_steps

    # a GPU's reduction order moves the weights' RMS values a little: still the same weights
    nearly = [[[name, value * (1 + 1e-5)] for name, value in signature] for signature in signatures(pipe)]
    data["setting"]["weights_signatures"] = nearly
    EdgeMeasurements.from_dict(data).save(checkpoint)
    resolved = make_plans(pipe, prompts, STEPS, [3], 2, kwargs, tmp_path / "e", checkpoint, progress=False)
    assert resolved[0].plan.weights_signatures == first[0].plan.weights_signatures  # the pipeline's own
    # a checkpoint from before weights signatures: re-solved, and the plans carry the pipeline's signatures
    del data["setting"]["weights_signatures"]
    EdgeMeasurements.from_dict(data).save(checkpoint)
    older = make_plans(pipe, prompts, STEPS, [3], 2, kwargs, tmp_path / "f", checkpoint, progress=False)
    assert first[0].plan.weights_signatures is not None
    assert older[0].plan.weights_signatures == first[0].plan.weights_signatures
    # measured on other weights: never re-solved for these
    data["setting"]["weights_signatures"] = [[[name, value * 1.05] for name, value in signatures(pipe)[0]]]
    EdgeMeasurements.from_dict(data).save(checkpoint)
    with pytest.raises(AssertionError, match="must not generate"):
        make_plans(pipe, prompts, STEPS, [3], 2, kwargs, tmp_path / "g", checkpoint, progress=False)
    del data["setting"]["weights_signatures"]
    EdgeMeasurements.from_dict(data).save(checkpoint)
    # another setting (guidance scale) or other prompts: measured again, never mixed
    with pytest.raises(AssertionError, match="must not generate"):
        make_plans(pipe, prompts, STEPS, [3], 2, {**kwargs, "guidance_scale": 7.5}, tmp_path / "c", checkpoint,
                   progress=False)
    with pytest.raises(AssertionError, match="must not generate"):
        make_plans(pipe, ["another prompt"], STEPS, [3], 2, kwargs, tmp_path / "d", checkpoint, progress=False)


def test_plans_refuse_the_same_architecture_with_other_weights(small_wan, tmp_path, perturb_weights):
    pipe = small_wan
    planned = make_plans(pipe, ["a red circle moves left"], STEPS, [5], 1, planner_kwargs("wan"), tmp_path,
                         progress=False)
    plan = LeMiCaPlan.from_json(planned[0].path)
    assert plan.validate_against(*identity(pipe), STEPS, weights_signatures=signatures(pipe)) is plan

    sampled = weights_signature(pipe.transformer)[0][0]
    perturb_weights(pipe.transformer, sampled, 1.05)  # retrained: the same config, other weights
    with pytest.raises(PlanMismatchError, match=rf"measured on other weights .*RMS of {sampled}"):
        plan.validate_against(*identity(pipe), STEPS, weights_signatures=signatures(pipe))
    stock = pipe(**{**tiny_call_kwargs("wan", steps=STEPS), "output_type": "latent"}).frames
    with pytest.raises(PlanMismatchError, match="other weights"):
        vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(plan=planned[0].path)))
    assert vidaccel.active_handle(pipe) is None
    after = pipe(**{**tiny_call_kwargs("wan", steps=STEPS), "output_type": "latent"}).frames
    assert torch.equal(after, stock)  # the failed apply left the pipeline as it was


def test_make_plans_checks_budgets_and_metric_before_measuring(small_wan, tmp_path):
    kwargs = planner_kwargs("wan")
    with pytest.raises(ValueError, match="budget 1 is infeasible for 6 steps with max_skip=2"):
        make_plans(small_wan, ["x"], STEPS, [1], 2, kwargs, tmp_path, progress=False)
    with pytest.raises(ValueError, match="metric must be one of"):
        make_plans(small_wan, ["x"], STEPS, [3], 2, kwargs, tmp_path, metric="psnr", progress=False)
    assert not any(tmp_path.iterdir())


def test_summary_table_lists_budgets():
    from vidaccel.offline_planner.planner import PlannedBudget
    from vidaccel.offline_planner.plan_file import PlanCreation
    from vidaccel.offline_planner.solver import PlanSegment

    plan = LeMiCaPlan(
        transformer_classes=("T",), config_fingerprints=("f",), scheduler_class="S", scheduler_config={},
        num_inference_steps=6, height=32, width=32, num_frames=9, computed_steps=(0, 3),
        error_metric="relative_l1", segments=(PlanSegment(0, 3, 0.25), PlanSegment(3, 6, 0.5)), prompts=("p",),
        creation=PlanCreation.now([]),
    )
    table = summary_table([PlannedBudget(2, plan, "/x/plan.json")]).splitlines()
    assert table[0].split() == ["budget", "computed", "steps", "max", "edge", "error", "file"]
    assert table[2].split() == ["2/6", "0", "3", "0.5", "plan.json"]


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="vidaccel plan")
    plan_command.add_arguments(parser)
    return plan_command.run(parser.parse_args(argv))


def test_cli_tiny_wan_writes_plans_and_resumes(tmp_path, capsys):
    out = tmp_path / "plans"
    argv = ["--tiny", "wan", "--steps", str(STEPS), "--budgets", "4,5", "--max-skip", "1", "--num-prompts", "1",
            "--out", str(out), "--quiet"]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "max edge error" in printed and "4/6" in printed and "5/6" in printed
    plans = {budget: LeMiCaPlan.from_json(out / plan_filename(STEPS, budget)) for budget in (4, 5)}
    assert plans[4].budget == 4 and plans[5].budget == 5
    assert all(plan.weights_signatures is not None and len(plan.weights_signatures[0]) == 16 for plan in plans.values())
    checkpoint = out / f"lemica-edges-{STEPS}steps.json"
    assert len(EdgeMeasurements.load(checkpoint).errors) == 5

    assert run_cli(argv) == 2  # an existing checkpoint is never overwritten silently
    assert "--resume" in capsys.readouterr().err

    assert run_cli(argv + ["--resume", "--budgets", "2,3", "--max-skip", "2"]) == 0  # extends the measurements
    assert len(EdgeMeasurements.load(checkpoint).errors) == 9
    assert LeMiCaPlan.from_json(out / plan_filename(STEPS, 2)).budget == 2


def test_cli_errors_are_clear(tmp_path, capsys, monkeypatch):
    assert run_cli(["--tiny", "wan", "--steps", "6", "--budgets", "1", "--max-skip", "2", "--out", str(tmp_path)]) == 2
    assert "infeasible" in capsys.readouterr().err
    assert run_cli(["--tiny", "wan", "--steps", "6", "--budgets", "3", "--metric", "psnr", "--out", str(tmp_path)]) == 2
    assert "--metric must be one of" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "vidaccel.reference", None)  # a vidaccel without the reference model
    assert run_cli(["--reference", "--steps", "6", "--budgets", "3", "--prompts", plan_command_prompts(tmp_path),
                    "--out", str(tmp_path)]) == 2
    assert "reference model is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(["--tiny", "wan", "--steps", "6", "--budgets", "3,x", "--out", str(tmp_path)])


def plan_command_prompts(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('["a red circle moves left"]')
    return str(path)
