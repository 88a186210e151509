"""LeMiCa at run time: plan steps computed, every other step replays the block stack's cached residual."""

import dataclasses
import json

import pytest
import torch

import vidaccel
from vidaccel.attention.dense import DenseAttention
from vidaccel.caching import LeMiCa
from vidaccel.offline_planner.plan_file import (LeMiCaPlan, PlanCreation, PlanMismatchError, PlanWarning,
                                                config_fingerprint)
from vidaccel.offline_planner.weights_signature import weights_signature
from vidaccel.testing import tiny_call_kwargs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core runner they lose a lot to them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def latents(pipe, kind, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**{**tiny_call_kwargs(kind, **kwargs), "output_type": "latent"}).frames


def per_branch(handle, transformer="transformer"):
    return handle.stats()["cache"]["per_branch"][transformer]


def plan_for(pipe, computed_steps, num_steps, fingerprints=None, signed=False):
    """A plan for ``pipe``'s model; ``signed`` records the weights signatures it has now."""
    transformers = [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]
    return LeMiCaPlan(
        transformer_classes=tuple(type(t).__name__ for t in transformers),
        config_fingerprints=fingerprints or tuple(config_fingerprint(t.config) for t in transformers),
        scheduler_class=type(pipe.scheduler).__name__, scheduler_config=dict(pipe.scheduler.config),
        num_inference_steps=num_steps, height=32, width=32, num_frames=9, computed_steps=tuple(computed_steps),
        error_metric=None, segments=(), prompts=("a red circle",), creation=PlanCreation.now(["test"]),
        weights_signatures=[weights_signature(t) for t in transformers] if signed else None,
    )


@pytest.mark.parametrize("kwargs,message", [
    ({}, "exactly one of"), (dict(computed_steps=[0], plan="p.json"), "exactly one of"),
    (dict(computed_steps=[1, 2]), "must include step 0"), (dict(computed_steps=[0, 2, 2]), "repeated"),
    (dict(computed_steps=[0, -1]), ">= 0"), (dict(computed_steps=[0, 4], num_inference_steps=4), "reach past"),
    (dict(computed_steps=[0], allow_rescale=True), "allow_rescale"),
    (dict(plan="p.json", num_inference_steps=4), "records its own"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LeMiCa(**kwargs)


def test_config_sorts_steps_and_is_hashable():
    config = LeMiCa(computed_steps=[3, 0, 1])
    assert config.computed_steps == (0, 1, 3)
    assert hash(config) == hash(LeMiCa(computed_steps=(0, 1, 3)))


def test_all_steps_computed_equals_stock(tiny_pipelines):
    pipe = tiny_pipelines["wan"]
    stock = latents(pipe, "wan", steps=3)
    with vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(computed_steps=[0, 1, 2]))) as handle:
        torch.testing.assert_close(latents(pipe, "wan", steps=3), stock, rtol=0, atol=0)
        assert per_branch(handle)["uncond"]["computed_steps"] == [0, 1, 2]
        assert handle.stats()["cache"]["cached"] == 0


def test_skipped_steps_call_no_block_and_replay_the_stack_residual(tiny_pipelines):
    pipe = tiny_pipelines["wan"]
    stock = latents(pipe, "wan", steps=4)
    blocks = list(pipe.transformer.blocks)
    block_steps, stack = [], []  # steps at which any block submodule ran; (branch, step, stack in, stack out)
    with vidaccel.apply(pipe, vidaccel.Preset(attention=DenseAttention(),
                                              cache=LeMiCa(computed_steps=[0, 2]))) as handle:
        context = handle.adapter.context
        hooks = [module.register_forward_pre_hook(lambda *_: block_steps.append(context.step_index))
                 for block in blocks for module in block.modules() if module is not block]
        hooks.append(blocks[0].register_forward_pre_hook(
            lambda module, args: stack.append([context.branch, context.step_index, args[0]])))
        hooks.append(pipe.transformer.norm_out.register_forward_pre_hook(
            lambda module, args: stack[-1].append(args[0])))  # the block stack's output (as float32)
        try:
            out = latents(pipe, "wan", steps=4)
        finally:
            for hook in hooks:
                hook.remove()
        stats = handle.stats()
    assert sorted(set(block_steps)) == [0, 2]
    for branch in ("cond", "uncond"):
        entry = stats["cache"]["per_branch"]["transformer"][branch]
        assert (entry["computed_steps"], entry["cached_steps"]) == ([0, 2], [1, 3])
        assert stats["attention"]["attention_calls"][branch]["dense"] == 2 * len(blocks)
        calls = {step: (x, y) for b, step, x, y in stack if b == branch}
        for skipped, source in ((1, 0), (3, 2)):
            torch.testing.assert_close(calls[skipped][1] - calls[skipped][0], calls[source][1] - calls[source][0],
                                       rtol=1e-4, atol=1e-5)
    assert stats["cache"]["plan_steps"] == {"4": [0, 2]}
    assert not torch.equal(out, stock) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind,branches", [("hunyuan", ["cond", "uncond"]), ("cogvideox", ["cond_uncond"])])
def test_joint_models(kind, branches, tiny_pipelines):
    pipe = tiny_pipelines[kind]
    with vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(computed_steps=[0, 2]))) as handle:
        first = latents(pipe, kind, steps=3)
        second = latents(pipe, kind, steps=3)  # a new generation starts from an empty cache
        entries = per_branch(handle)
    assert sorted(entries) == branches
    for branch in branches:
        assert (entries[branch]["computed_steps"], entries[branch]["cached_steps"]) == ([0, 2], [1])
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert torch.isfinite(first).all()


def test_wan22_computes_each_experts_first_step(tiny_pipelines):
    pipe = tiny_pipelines["wan2.2"]
    with vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(computed_steps=[0]))) as handle:
        latents(pipe, "wan2.2", steps=5)
        stats = handle.stats()["cache"]["per_branch"]
    high, low = stats["transformer"]["cond"], stats["transformer_2"]["cond"]
    switch = min(low["computed_steps"] + low["cached_steps"])
    assert 0 < switch < 5
    assert high["computed_steps"] == [0] and high.get("forced_steps") is None
    assert low["computed_steps"] == [switch] and low["forced_steps"] == [switch]
    assert stats["transformer_2"]["uncond"]["forced_steps"] == [switch]


def test_removal_restores_stock(tiny_pipelines):
    pipe = tiny_pipelines["wan"]
    stock = latents(pipe, "wan", steps=3)
    handle = vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(computed_steps=[0])))
    assert not torch.equal(latents(pipe, "wan", steps=3), stock)
    handle.remove()
    assert not any(hasattr(block, "_diffusers_hook") for block in pipe.transformer.blocks)
    torch.testing.assert_close(latents(pipe, "wan", steps=3), stock, rtol=0, atol=0)


def test_step_count_mismatch_names_both_counts(tiny_pipelines):
    pipe = tiny_pipelines["wan"]
    with vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(computed_steps=[0, 2], num_inference_steps=5))):
        with pytest.raises(PlanMismatchError, match="chosen for 5 steps; this run has 3 steps"):
            latents(pipe, "wan", steps=3)
    with vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(computed_steps=[0, 4]))):
        with pytest.raises(PlanMismatchError, match="reach step 4, but this run has 3 steps"):
            latents(pipe, "wan", steps=3)


def test_plan_file_drives_the_same_steps(tiny_pipelines, tmp_path):
    pipe = tiny_pipelines["wan"]
    path = tmp_path / "plan.json"
    plan_for(pipe, [0, 2], 4).to_json(path)
    with vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(computed_steps=[0, 2]))):
        explicit = latents(pipe, "wan", steps=4)
    with vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(plan=path))) as handle:
        planned = latents(pipe, "wan", steps=4)
        assert per_branch(handle)["cond"]["cached_steps"] == [1, 3]
        assert json.loads(json.dumps(handle.stats()))["cache"]["config"]["plan"] == str(path)
        with pytest.raises(PlanMismatchError, match="with 4 steps; this pipeline is .* with 3 steps"):
            latents(pipe, "wan", steps=3)
    torch.testing.assert_close(planned, explicit, rtol=0, atol=0)

    with vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(plan=path, allow_rescale=True))) as handle:
        with pytest.warns(PlanWarning, match="rescaled to 8 steps"):
            latents(pipe, "wan", steps=8)
        assert handle.stats()["cache"]["plan_steps"]["8"][0] == 0


def test_plan_for_another_model_fails_at_apply(tiny_pipelines, tmp_path):
    pipe = tiny_pipelines["wan"]
    path = tmp_path / "other.json"
    plan_for(pipe, [0, 2], 4, fingerprints=("0123456789abcdef",)).to_json(path)
    with pytest.raises(PlanMismatchError, match="0123456789abcdef"):
        vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(plan=path)))
    assert vidaccel.active_handle(pipe) is None
    assert not any(hasattr(block, "_diffusers_hook") for block in pipe.transformer.blocks)


def hook_names(model):
    """The diffusers hooks on every submodule (a registry may stay behind, empty, after hooks are removed)."""
    return {name: tuple(module._diffusers_hook._hook_order) for name, module in model.named_modules()
            if hasattr(module, "_diffusers_hook")}


def test_plan_for_other_weights_fails_at_apply_and_leaves_the_pipeline_alone(tiny_pipelines, tmp_path,
                                                                            perturb_weights):
    pipe = tiny_pipelines["wan"]
    path = tmp_path / "plan.json"
    plan_for(pipe, [0, 2], 4, signed=True).to_json(path)
    with vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(plan=path))) as handle:  # the weights it was made on
        latents(pipe, "wan", steps=4)
        assert per_branch(handle)["cond"]["cached_steps"] == [1, 3]

    sampled = weights_signature(pipe.transformer)[5][0]
    perturb_weights(pipe.transformer, sampled, 1.05)  # the same architecture, retrained
    stock, hooks = latents(pipe, "wan", steps=4), hook_names(pipe.transformer)
    with pytest.raises(PlanMismatchError, match=rf"measured on other weights of WanTransformer3DModel .*{sampled}"):
        vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(plan=path)))
    assert vidaccel.active_handle(pipe) is None
    assert hook_names(pipe.transformer) == hooks
    torch.testing.assert_close(latents(pipe, "wan", steps=4), stock, rtol=0, atol=0)
    with pytest.raises(PlanMismatchError, match="other weights"):  # rescaling cannot help either
        vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(plan=path, allow_rescale=True)))


def test_config_round_trips_through_dict():
    config = LeMiCa(computed_steps=[0, 5, 9], num_inference_steps=12)
    data = config.to_dict()
    assert data["method"] == "lemica" and data["computed_steps"] == (0, 5, 9)
    fields = {f.name for f in dataclasses.fields(LeMiCa)}
    assert LeMiCa(**{k: v for k, v in data.items() if k in fields}) == config
