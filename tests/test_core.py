"""vidaccel.apply / remove on every tiny pipeline: dense reproduces stock, removal restores exactly, step
context is right, errors are clear."""

import dataclasses

import numpy as np
import pytest

import vidaccel
from vidaccel.attention.dense import DenseAttention, DenseAttentionMethod
from vidaccel.testing import KINDS, tiny_call_kwargs, tiny_pipeline


def run(pipe, kind, **kwargs):
    return np.asarray(pipe(**tiny_call_kwargs(kind, **kwargs)).frames)


def module_snapshot(pipe):
    """Everything apply/remove may touch: per module its processor object, hook registry and forward attribute."""
    snap = {}
    for component in ("transformer", "transformer_2", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            snap[(component, name)] = (
                id(module), id(getattr(module, "processor", None)),
                tuple(registry._hook_order) if registry is not None else None,
                module.__dict__.get("forward"),
            )
    return snap


@pytest.mark.parametrize("kind", KINDS)
def test_dense_matches_stock_and_remove_restores(kind, tiny_pipelines):
    pipe = tiny_pipelines[kind]
    stock = run(pipe, kind)
    before = module_snapshot(pipe)
    handle = vidaccel.apply(pipe, "dense")
    assert module_snapshot(pipe) != before
    dense = run(pipe, kind)
    np.testing.assert_allclose(dense, stock, atol=2e-5, rtol=0)
    stats = handle.stats()
    assert sum(stats["attention"]["attention_calls"][b]["dense"] for b in stats["attention"]["attention_calls"]) > 0
    handle.remove()
    handle.remove()  # idempotent
    assert module_snapshot(pipe) == before
    np.testing.assert_array_equal(run(pipe, kind), stock)


def test_remove_before_any_generation_leaves_no_trace():
    pipe = tiny_pipeline("wan")
    transformer = pipe.transformer
    before = dict(transformer.__dict__)
    processors = [block.attn1.processor for block in transformer.blocks]
    with vidaccel.apply(pipe, "dense") as handle:
        assert vidaccel.active_handle(pipe) is handle
        assert hasattr(transformer, "_diffusers_hook")
    assert vidaccel.active_handle(pipe) is None
    assert set(transformer.__dict__) == set(before)
    assert [block.attn1.processor for block in transformer.blocks] == processors


def test_two_pipelines_do_not_affect_each_other():
    accelerated, plain = tiny_pipeline("wan"), tiny_pipeline("wan")
    reference = run(plain, "wan", steps=2)
    handle = vidaccel.apply(accelerated, vidaccel.Preset(attention=RecordingAttention()))
    run(accelerated, "wan", steps=2)
    calls_after_first = len(handle.methods[0].records)
    np.testing.assert_array_equal(run(plain, "wan", steps=2), reference)
    assert len(handle.methods[0].records) == calls_after_first  # the plain pipeline never reached our processors
    assert plain.transformer.blocks[0].attn1.processor is not accelerated.transformer.blocks[0].attn1.processor
    handle.remove()


# --- step context ---------------------------------------------------------------------------------------------

class RecordingMethod(DenseAttentionMethod):
    """Dense attention that records what the step context says at layer 0 of every transformer call."""

    def __init__(self):
        super().__init__()
        self.records = []

    def attend(self, query, key, value, call):
        if call.layer_index == 0:
            ctx = call.context
            self.records.append((ctx.generation, ctx.step_index, ctx.num_steps, ctx.branch,
                                 call.transformer_name, query.shape[0]))
        return super().attend(query, key, value, call)


@dataclasses.dataclass(frozen=True)
class RecordingAttention(DenseAttention):
    name = "recording"

    def build(self):
        return RecordingMethod()


def expected_records(kind, pipe, steps, cfg, batch, generation):
    branches = {"cogvideox": ["cond_uncond"], "hunyuan": ["cond", "uncond"] if cfg else ["cond"]}.get(
        kind, ["cond", "uncond"] if cfg else ["cond"])
    per_call_batch = batch * (2 if kind == "cogvideox" and cfg else 1)
    records = []
    pipe.scheduler.set_timesteps(steps)
    timesteps = pipe.scheduler.timesteps
    for i in range(steps):
        name = "transformer"
        if kind == "wan2.2":
            boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
            name = "transformer" if timesteps[i] >= boundary else "transformer_2"
        for branch in branches:
            records.append((generation, i, steps, branch, name, per_call_batch))
    return records


@pytest.mark.parametrize("kind,steps,cfg,batch", [
    ("wan", 1, True, 1), ("wan", 4, True, 2), ("wan", 7, False, 1),
    ("wan2.2", 4, True, 1), ("wan2.2", 7, False, 2), ("wan-i2v", 4, True, 1),
    ("hunyuan", 1, False, 1), ("hunyuan", 4, True, 2), ("hunyuan", 7, True, 1),
    ("cogvideox", 1, True, 1), ("cogvideox", 4, False, 2), ("cogvideox", 7, True, 1),
])
def test_step_index_and_branch(kind, steps, cfg, batch, tiny_pipelines):
    pipe = tiny_pipelines[kind]
    with vidaccel.apply(pipe, vidaccel.Preset(attention=RecordingAttention())) as handle:
        recorder = handle.methods[0]
        for generation in (1, 2):  # two consecutive generations
            recorder.records.clear()
            call = tiny_call_kwargs(kind, steps=steps, cfg=cfg, batch_size=batch)
            call["output_type"] = "latent"
            pipe(**call)
            assert recorder.records == expected_records(kind, pipe, steps, cfg, batch, generation)


# --- errors ----------------------------------------------------------------------------------------------------

def test_unsupported_pipeline_error_names_class_and_supported():
    class MyPipeline:
        pass

    with pytest.raises(vidaccel.UnsupportedPipelineError) as info:
        vidaccel.apply(MyPipeline(), "dense")
    message = str(info.value)
    assert "MyPipeline" in message and "WanPipeline" in message and "CogVideoXPipeline" in message


def test_unknown_preset_lists_valid_names(tiny_pipelines):
    with pytest.raises(ValueError, match="unknown vidaccel preset 'turbo'.*dense"):
        vidaccel.apply(tiny_pipelines["wan"], "turbo")


def test_applying_twice_raises_and_leaves_first_intact(tiny_pipelines):
    pipe = tiny_pipelines["cogvideox"]
    with vidaccel.apply(pipe, "dense") as handle:
        processors = [b.attn1.processor for b in pipe.transformer.transformer_blocks]
        with pytest.raises(vidaccel.AlreadyAcceleratedError, match="remove()"):
            vidaccel.apply(pipe, "dense")
        assert [b.attn1.processor for b in pipe.transformer.transformer_blocks] == processors
        assert vidaccel.active_handle(pipe) is handle


def test_preset_validates_roles():
    with pytest.raises(TypeError, match="attention method"):
        vidaccel.Preset(cache=DenseAttention())
    with pytest.raises(TypeError, match="must be a vidaccel method config"):
        vidaccel.Preset(attention="dense")
    assert "dense" in vidaccel.list_presets()


def test_failed_install_restores_everything(tiny_pipelines):
    pipe = tiny_pipelines["wan"]
    before = module_snapshot(pipe)

    class Boom(DenseAttentionMethod):
        def install(self, adapter):
            super().install(adapter)
            raise RuntimeError("boom")

    @dataclasses.dataclass(frozen=True)
    class BoomAttention(DenseAttention):
        def build(self):
            return Boom()

    with pytest.raises(RuntimeError, match="boom"):
        vidaccel.apply(pipe, vidaccel.Preset(attention=BoomAttention()))
    assert module_snapshot(pipe) == before
    assert vidaccel.active_handle(pipe) is None
