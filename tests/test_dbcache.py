"""DBCache: decision logic on synthetic residuals, then block skipping on every tiny pipeline family."""

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest
import torch

import vidaccel
from vidaccel.adapters import for_pipeline
from vidaccel.attention.dense import DenseAttention
from vidaccel.caching import DBCache
from vidaccel.caching.block_skip import Streams
from vidaccel.caching.dbcache import DBCacheState, relative_l1
from vidaccel.caching.forecast import ResidualForecaster
from vidaccel.testing import tiny_call_kwargs

ALWAYS_CACHE = dict(threshold=1e9, warmup_steps=1)  # every call after the first one of a branch is cached


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


def module_snapshot(pipe):
    """Per module of the transformers: identity, processor, hook names and instance-level forward."""
    snap = {}
    for component in ("transformer", "transformer_2"):
        model = getattr(pipe, component, None)
        for name, module in (model.named_modules() if model is not None else ()):
            registry = getattr(module, "_diffusers_hook", None)
            snap[(component, name)] = (id(module), id(getattr(module, "processor", None)),
                                       tuple(registry._hook_order) if registry is not None else None,
                                       module.__dict__.get("forward"))
    return snap


def branch_stats(handle, transformer="transformer"):
    return handle.stats()["cache"]["per_branch"][transformer]


# --- decision logic ---------------------------------------------------------------------------------------------

def test_relative_l1_matches_definition():
    now, ref = torch.randn(2, 7, 5), torch.randn(2, 7, 5)
    expected = np.abs(now.numpy() - ref.numpy()).mean() / np.abs(ref.numpy()).mean()
    assert relative_l1(now, ref).item() == pytest.approx(expected, rel=1e-6)
    half = relative_l1(now.half(), ref.half())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(expected, rel=2e-3)


def scripted_decisions(config, probes):
    """Feed probe residuals to one branch's state as the method would; return the decisions."""
    state = DBCacheState(config)
    decisions = []
    for step, probe in enumerate(probes):
        cache = state.decide(step, probe)
        if not cache:  # a computed middle leaves its residual, as the span's last block would
            state.forecaster.update(step, Streams(torch.full_like(probe, float(step))))
        decisions.append(cache)
    return decisions, state


def drifting(relative_steps):
    """Probe residuals 1, 1+d1, 1+d1+d2, ... (constant tensors, so each relative L1 is exact)."""
    value, probes = 1.0, []
    for step in [0.0, *relative_steps]:
        value += step
        probes.append(torch.full((3, 4), value))
    return probes


def test_decision_follows_threshold_against_last_computed_step():
    # Probe residuals grow 5% of the first one per step, threshold 0.12: steps 1-2 are within 10% of step 0
    # and cached; step 3 is 15% away from the last computed step (not 5% from the previous one) and computes;
    # from then on the diffs are measured against step 3.
    decisions, state = scripted_decisions(DBCache(threshold=0.12, warmup_steps=0), drifting([0.05] * 6))
    assert decisions == [False, True, True, False, True, True, False]
    diffs = [d for _, d in state.diffs_for_stats()]
    assert diffs[0] is None
    assert diffs[1:4] == pytest.approx([0.05, 0.10, 0.15], rel=1e-5)
    assert diffs[4:] == pytest.approx([0.05 / 1.15, 0.10 / 1.15, 0.15 / 1.15], rel=1e-5)
    assert state.vetoes == {"nothing_cached": 1}
    assert (state.cached_total, state.consecutive_cached) == (4, 0)


def test_threshold_zero_never_caches_and_huge_always_caches():
    probes = drifting([0.3, 0.0, 0.01, 0.5])
    assert scripted_decisions(DBCache(threshold=0.0, warmup_steps=0), probes)[0] == [False] * 5
    assert scripted_decisions(DBCache(threshold=1e9, warmup_steps=0), probes)[0] == [False] + [True] * 4


def test_warmup_and_limit_vetoes():
    probes = drifting([0.0] * 9)
    decisions, state = scripted_decisions(DBCache(threshold=1.0, warmup_steps=3), probes)
    assert decisions == [False] * 3 + [True] * 7
    assert state.vetoes == {"nothing_cached": 1, "warmup": 2}

    decisions, state = scripted_decisions(DBCache(threshold=1.0, warmup_steps=1, max_consecutive_cached=2), probes)
    assert decisions == [False, True, True, False, True, True, False, True, True, False]
    assert state.vetoes["max_consecutive_cached"] == 3

    decisions, state = scripted_decisions(DBCache(threshold=1.0, warmup_steps=1, max_cached_steps=3), probes)
    assert decisions == [False, True, True, True] + [False] * 6
    assert state.vetoes["max_cached_steps"] == 6


def test_vetoed_calls_make_no_host_sync(monkeypatch):
    """Only calls that actually compare with the threshold read the diff on the host."""
    syncs = []
    original_item = torch.Tensor.item

    def counting_item(self):
        syncs.append(1)
        return original_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    scripted_decisions(DBCache(threshold=1.0, warmup_steps=4), drifting([0.0] * 5))
    assert len(syncs) == 2  # steps 4 and 5; steps 0-3 are the first step and warm-up


def test_forecaster_orders():
    a, b, c = torch.randn(4), torch.randn(4), torch.randn(4)
    quadratic = {t: Streams(a + b * t + c * t * t, 2 * a) for t in (0, 2, 4)}
    linear = {t: Streams(a + b * t) for t in (0, 2, 4)}
    reuse, first, second = ResidualForecaster(0), ResidualForecaster(1), ResidualForecaster(2)
    for t in (0, 2, 4):
        reuse.update(t, quadratic[t])
        first.update(t, linear[t])
        second.update(t, quadratic[t])
    assert reuse.predict(5).hidden is quadratic[4].hidden
    torch.testing.assert_close(first.predict(5).hidden, a + 5 * b)  # a line is forecast exactly
    # backward differences: d1 = b + 6c, d2 = 2c, so r(4) + d1 + d2/2 = a + 5b + 23c
    torch.testing.assert_close(second.predict(5).hidden, a + 5 * b + 23 * c)
    torch.testing.assert_close(second.predict(5).encoder, 2 * a)  # the text stream is forecast too
    assert second.terms_available == 3
    with pytest.raises(ValueError, match="order"):
        ResidualForecaster(3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(Fn=0), "Fn must be a positive integer"), (dict(Bn=-1), "Bn"), (dict(threshold=-0.1), "threshold"),
    (dict(threshold=math.nan), "threshold"), (dict(warmup_steps=1.5), "warmup_steps"),
    (dict(max_cached_steps=-2), "max_cached_steps"), (dict(taylorseer_order=3), "taylorseer_order"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DBCache(**kwargs)


def test_block_split_defaults_and_errors():
    assert DBCache().block_split(30) == (8, 0)
    assert DBCache().block_split(4) == (2, 0)
    assert DBCache(Bn=1).block_split(4) == (1, 1)
    assert DBCache(Fn=3).block_split(4) == (3, 0)
    with pytest.raises(ValueError, match=r"Fn=4, Bn=0\) leaves no middle blocks.*4 blocks.*at most 3"):
        DBCache(Fn=4).block_split(4)


def test_too_many_blocks_fails_at_apply_and_leaves_pipeline_untouched(tiny_pipelines):
    pipe = tiny_pipelines["wan"]
    before = module_snapshot(pipe)
    with pytest.raises(ValueError, match="transformer \\(WanTransformer3DModel\\), which has 4 blocks"):
        vidaccel.apply(pipe, vidaccel.Preset(cache=DBCache(Fn=3, Bn=1)))
    assert module_snapshot(pipe) == before and vidaccel.active_handle(pipe) is None


# --- on pipelines ---------------------------------------------------------------------------------------------

def test_threshold_zero_reproduces_stock_and_remove_restores(tiny_pipelines):
    pipe = tiny_pipelines["wan"]
    stock = latents(pipe, "wan", steps=3)
    before = module_snapshot(pipe)
    handle = vidaccel.apply(pipe, vidaccel.Preset(cache=DBCache(threshold=0.0, warmup_steps=0)))
    assert module_snapshot(pipe) != before
    torch.testing.assert_close(latents(pipe, "wan", steps=3), stock, rtol=0, atol=0)
    assert branch_stats(handle)["cond"]["computed_steps"] == [0, 1, 2]
    assert handle.stats()["cache"]["cached"] == 0
    handle.remove()
    assert module_snapshot(pipe) == before
    torch.testing.assert_close(latents(pipe, "wan", steps=3), stock, rtol=0, atol=0)


def test_cached_step_runs_no_middle_block(tiny_pipelines):
    """Self-attention calls (counted by the dense attention method) and calls of any submodule of the
    middle blocks show that a cached step runs the probe only."""
    pipe = tiny_pipelines["wan"]
    middle_steps = []
    with vidaccel.apply(pipe, vidaccel.Preset(attention=DenseAttention(),
                                              cache=DBCache(Fn=2, **ALWAYS_CACHE))) as handle:
        context = handle.adapter.context
        hooks = [module.register_forward_pre_hook(lambda *_: middle_steps.append(context.step_index))
                 for block in pipe.transformer.blocks[2:] for module in block.modules() if module is not block]
        try:
            out = latents(pipe, "wan", steps=4)
        finally:
            for hook in hooks:
                hook.remove()
        stats = handle.stats()
    per_branch = stats["cache"]["per_branch"]["transformer"]
    for branch in ("cond", "uncond"):
        assert per_branch[branch]["computed_steps"] == [0]
        assert per_branch[branch]["cached_steps"] == [1, 2, 3]
        # the computed call runs 4 self-attentions, each cached call only the 2 probe blocks
        assert stats["attention"]["attention_calls"][branch]["dense"] == 4 + 3 * 2
    assert middle_steps and set(middle_steps) == {0}
    assert torch.isfinite(out).all()


def test_probe_diffs_are_per_branch(tiny_pipelines):
    """Each branch's diffs compare that branch's probe residuals only (threshold 0: every step computes, so
    the reference is always the previous step of the same branch)."""
    pipe = tiny_pipelines["wan"]
    probes = {"cond": [], "uncond": []}
    with vidaccel.apply(pipe, vidaccel.Preset(cache=DBCache(Fn=1, threshold=0.0, warmup_steps=0))) as handle:
        context = handle.adapter.context
        hook = pipe.transformer.blocks[0].register_forward_hook(
            lambda module, args, output: probes[context.branch].append(output - args[0]))
        try:
            latents(pipe, "wan", steps=3)
        finally:
            hook.remove()
        per_branch = branch_stats(handle)
    for branch in ("cond", "uncond"):
        diffs = [d for _, d in per_branch[branch]["probe_diffs"]]
        expected = [relative_l1(now, prev).item() for prev, now in zip(probes[branch], probes[branch][1:])]
        assert diffs[0] is None and diffs[1:] == pytest.approx(expected, rel=1e-5)
    assert per_branch["cond"]["probe_diffs"] != per_branch["uncond"]["probe_diffs"]


def test_two_generations_give_identical_output(tiny_pipelines):
    pipe = tiny_pipelines["wan"]
    with vidaccel.apply(pipe, vidaccel.Preset(cache=DBCache(Fn=2, threshold=1e9, warmup_steps=2))) as handle:
        first = latents(pipe, "wan", steps=4)
        first_stats = handle.stats()["cache"]
        second = latents(pipe, "wan", steps=4)
        second_stats = handle.stats()["cache"]
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert second_stats["generation"] == first_stats["generation"] + 1
    assert second_stats["per_branch"] == first_stats["per_branch"]
    assert second_stats["total_cached"] == 2 * first_stats["cached"] == 8


def test_batch_of_two_caches_each_sample_like_a_batch_of_one(tiny_pipelines):
    pipe = tiny_pipelines["wan"]
    noise = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    prompts = tiny_call_kwargs("wan", batch_size=2)["prompt"]
    with vidaccel.apply(pipe, vidaccel.Preset(cache=DBCache(Fn=2, **ALWAYS_CACHE))) as handle:
        both = pipe(**{**tiny_call_kwargs("wan", steps=3, batch_size=2), "latents": noise,
                       "output_type": "latent"}).frames
        assert branch_stats(handle)["cond"]["cached_steps"] == [1, 2]
        single = pipe(**{**tiny_call_kwargs("wan", steps=3), "prompt": prompts[0], "latents": noise[:1],
                         "output_type": "latent"}).frames
    torch.testing.assert_close(both[:1], single, rtol=1e-4, atol=1e-5)


def test_wan22_keeps_state_per_expert(tiny_pipelines):
    pipe = tiny_pipelines["wan2.2"]
    with vidaccel.apply(pipe, vidaccel.Preset(cache=DBCache(Fn=2, **ALWAYS_CACHE))) as handle:
        latents(pipe, "wan2.2", steps=6)
        per_transformer = handle.stats()["cache"]["per_branch"]
    assert set(per_transformer) == {"transformer", "transformer_2"}
    high, low = per_transformer["transformer"]["cond"], per_transformer["transformer_2"]["cond"]
    # each expert computes its own first call: the other expert's residual is never replayed
    assert high["computed_steps"] == [0] and low["computed_steps"] == [min(low["computed_steps"] + low["cached_steps"])]
    assert sorted(high["computed_steps"] + high["cached_steps"] + low["computed_steps"] + low["cached_steps"]) \
        == list(range(6))
    assert high["vetoes"] == low["vetoes"] == {"nothing_cached": 1}


@pytest.mark.parametrize("kind", ["hunyuan", "cogvideox"])
def test_joint_blocks_replay_both_streams(kind, tiny_pipelines):
    """Fn=1, Bn=1: on a cached call the corrector's input is the middle's input plus the middle residual of
    the last computed call, for the video and the text stream alike."""
    pipe = tiny_pipelines[kind]
    blocks = for_pipeline(pipe).blocks(pipe.transformer)
    records = []  # (branch, "middle"/"corrector", video, text)

    def recorder(role):
        def hook(module, args, kwargs):
            streams = (kwargs.get("hidden_states", args[0] if args else None),
                       kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None))
            records.append((context.branch, role, *streams))
        return hook

    with vidaccel.apply(pipe, vidaccel.Preset(cache=DBCache(Fn=1, Bn=1, **ALWAYS_CACHE))) as handle:
        context = handle.adapter.context
        hooks = [blocks[1].register_forward_pre_hook(recorder("middle"), with_kwargs=True),
                 blocks[-1].register_forward_pre_hook(recorder("corrector"), with_kwargs=True)]
        try:
            latents(pipe, kind, steps=3)
        finally:
            for h in hooks:
                h.remove()
        per_branch = branch_stats(handle)
    branches = sorted(per_branch)
    assert branches == (["cond", "uncond"] if kind == "hunyuan" else ["cond_uncond"])
    for branch in branches:
        assert per_branch[branch]["computed_steps"] == [0] and per_branch[branch]["cached_steps"] == [1, 2]
        calls = [r for r in records if r[0] == branch]
        middles, correctors = [r for r in calls if r[1] == "middle"], [r for r in calls if r[1] == "corrector"]
        assert len(middles) == 3 and len(correctors) == 3  # the middle's first block is still called, as a stand-in
        video_residual = correctors[0][2] - middles[0][2]
        text_residual = correctors[0][3] - middles[0][3]
        assert text_residual.abs().max() > 0
        for middle, corrector in zip(middles[1:], correctors[1:]):
            torch.testing.assert_close(corrector[2] - middle[2], video_residual, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(corrector[3] - middle[3], text_residual, rtol=1e-4, atol=1e-5)


def test_taylorseer_changes_the_replayed_residual(tiny_pipelines):
    pipe = tiny_pipelines["wan"]
    config = dict(Fn=2, threshold=1e9, warmup_steps=3)
    with vidaccel.apply(pipe, vidaccel.Preset(cache=DBCache(**config))):
        reuse = latents(pipe, "wan", steps=5)
    with vidaccel.apply(pipe, vidaccel.Preset(cache=DBCache(taylorseer_order=2, **config))) as handle:
        forecast = latents(pipe, "wan", steps=5)
        assert branch_stats(handle)["cond"]["cached_steps"] == [3, 4]
    assert torch.isfinite(forecast).all()
    assert not torch.equal(forecast, reuse)


def test_stats_are_json(tiny_pipelines):
    pipe = tiny_pipelines["cogvideox"]
    with vidaccel.apply(pipe, vidaccel.Preset(cache=DBCache(Fn=2, threshold=0.5, warmup_steps=1))) as handle:
        latents(pipe, "cogvideox", steps=3)
        stats = json.loads(json.dumps(handle.stats()))
    cache = stats["cache"]
    assert cache["method"] == "dbcache" and cache["blocks"]["transformer"] == {"Fn": 2, "Bn": 0, "middle": 2,
                                                                               "total": 4}
    entry = cache["per_branch"]["transformer"]["cond_uncond"]
    assert entry["computed"] + entry["cached"] == 3 and len(entry["probe_diffs"]) == 3


def test_benchmark_script_runs_tiny(tmp_path):
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_caching.py"
    spec = importlib.util.spec_from_file_location("bench_caching", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "caching.json"
    bench.main(["--tiny", "--steps", "3", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["config"]["tiny"] is True
    for name in ("dbcache", "lemica"):
        entry = result["methods"][name]
        assert entry["computed_call_ms"] > 0 and entry["skipped_call_ms"] > 0
        assert entry["skipped_calls"] > 0 and entry["computed_calls"] > 0
    assert result["methods"]["lemica"]["stats"]["cached"] == result["methods"]["lemica"]["skipped_calls"]
