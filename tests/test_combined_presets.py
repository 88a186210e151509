"""Combined presets (attention + cache + text encoder): per-family parameters and composition invariants.

The invariants are checked with exact counts from `handle.stats()`: every self-attention product of a
transformer call is accounted for by the layers that call ran (all of them when computed; only the DBCache probe
and corrector blocks when cached; none when LeMiCa skips the step), and its kind (dense warm-up step, dense layer,
sparse) follows from the *real* denoising step, whether or not earlier steps were cached.
"""

import collections

import pytest
import torch

import vidaccel
from vidaccel import DBCache, LeMiCa, Preset, RadialAttention
from vidaccel.attention.sparse_base import resolve_warmup
from vidaccel.offline_planner.plan_file import PlanWarning
from vidaccel.presets import COMBINED_PRESETS, preset_family, resolve_preset
from vidaccel.testing import KINDS, tiny_call_kwargs

# The tiny pipelines have no LeMiCa plans: the presets run their fallback DBCache there, and warn so.
pytestmark = pytest.mark.filterwarnings("ignore:vidaccel LeMiCa. no LeMiCa plan:UserWarning")
COMBINED = tuple(COMBINED_PRESETS)
FAMILY_OF_KIND = {"wan": "wan", "wan-i2v": "wan", "wan2.2": "wan2.2", "hunyuan": "hunyuan", "cogvideox": "cogvideox"}
SPARSE_KINDS = ("sparse", "unsupported_shape")  # what a sparse method does on a layer past its dense warm-up


def run(pipe, kind, steps=4, batch=1, **extra):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**{**tiny_call_kwargs(kind, steps=steps, batch_size=batch), "output_type": "latent", **extra}).frames


def expected_attention_calls(handle, steps):
    """Per CFG branch: how many attention products of each kind the cache log implies."""
    stats = handle.stats()
    attention = handle.preset.attention
    if attention is None:  # stock attention: vidaccel counts nothing
        return {}
    warmup = resolve_warmup(attention.dense_warmup, steps)
    expected = collections.defaultdict(collections.Counter)
    transformers = handle.adapter.transformers()
    cache = stats.get("cache")
    for name, transformer in transformers.items():
        layers = len(handle.adapter.self_attention_modules(transformer))
        if cache is None:
            continue
        split = cache.get("blocks", {}).get(name)  # DBCache: probe Fn and corrector Bn run on cached calls
        for branch, log in cache["per_branch"].get(name, {}).items():
            calls = [(step, False) for step in log["computed_steps"]] + [(step, True) for step in log["cached_steps"]]
            for step, cached in calls:
                if cached:
                    run_layers = [] if split is None else \
                        list(range(split["Fn"])) + list(range(layers - split["Bn"], layers))
                else:
                    run_layers = list(range(layers))
                for layer in run_layers:
                    if step < warmup:
                        expected[branch]["dense_warmup_step"] += 1
                    elif layer < attention.dense_layers:
                        expected[branch]["dense_layer"] += 1
                    else:
                        expected[branch]["sparse"] += 1
    return {branch: dict(counter) for branch, counter in expected.items()}


def measured_attention_calls(handle):
    out = {}
    if "attention" not in handle.stats():
        return out
    for branch, kinds in handle.stats()["attention"]["attention_calls"].items():
        counter = collections.Counter()
        for kind, count in kinds.items():
            counter["sparse" if kind in SPARSE_KINDS else kind] += count
        out[branch] = dict(counter)
    return out


def transformer_calls(handle):
    return handle.stats()["steps"]["transformer_calls"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_combined_preset_runs_batch_two_cfg_and_remove_restores(kind, tiny_pipelines):
    pipe = tiny_pipelines[kind]
    stock = run(pipe, kind, batch=2)
    for name in COMBINED:
        with vidaccel.apply(pipe, name) as handle:
            out = run(pipe, kind, batch=2)
            stats = handle.stats()
            assert handle.preset.family == FAMILY_OF_KIND[kind] == preset_family(handle.adapter)
            assert handle.preset == resolve_preset(name, family=FAMILY_OF_KIND[kind])
            assert measured_attention_calls(handle) == expected_attention_calls(handle, steps=4), name
            cache = stats["cache"]
            assert cache["computed"] + cache["cached"] == transformer_calls(handle)  # every call logged once
            if handle.preset.text_encoder is None:  # quality keeps the text encoder as loaded
                assert "text_encoder" not in stats, name
            else:
                encoders = [entry for entry in stats["text_encoder"].values() if isinstance(entry, dict)]
                assert encoders and all(entry["quantized_linear_layers"] > 0 for entry in encoders)
        assert out.shape == stock.shape and torch.isfinite(out).all(), (kind, name)
        torch.testing.assert_close(run(pipe, kind, batch=2), stock, rtol=0, atol=0)  # exact dense again


@pytest.mark.parametrize("kind", ["wan", "wan2.2", "hunyuan", "cogvideox"])
def test_cached_calls_run_only_the_probe_attention_and_stats_add_up(kind, tiny_pipelines):
    """Forced DBCache caching under the quality preset's attention: cached calls run the probe layers only."""
    pipe = tiny_pipelines[kind]
    base = resolve_preset("quality", family=FAMILY_OF_KIND[kind])
    preset = Preset(attention=RadialAttention(dense_warmup=1, dense_layers=1, block_size=64),
                    cache=DBCache(threshold=1e9, warmup_steps=1), text_encoder=base.text_encoder, name="forced")
    with vidaccel.apply(pipe, preset) as handle:
        out = run(pipe, kind, batch=2)
        cache = handle.stats()["cache"]
        assert cache["cached"] > 0
        assert measured_attention_calls(handle) == expected_attention_calls(handle, steps=4)
        layers = len(handle.adapter.self_attention_modules(pipe.transformer))  # Wan 2.2's experts: same depth
        total = sum(sum(kinds.values()) for kinds in measured_attention_calls(handle).values())
        assert total < layers * transformer_calls(handle)  # cached calls skipped the middle layers' attention
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["wan", "hunyuan", "cogvideox"])
def test_lemica_skipped_steps_call_no_attention_and_warmup_counts_real_steps(kind, tiny_pipelines):
    """Steps 0, 2, 3 computed, step 1 skipped; dense warm-up of 2 steps. Counted in real steps, step 2 is
    sparse (counted in computed steps it would be dense)."""
    pipe = tiny_pipelines[kind]
    preset = Preset(attention=RadialAttention(dense_warmup=2, dense_layers=1, block_size=64),
                    cache=LeMiCa(computed_steps=(0, 2, 3), num_inference_steps=4), name="lemica-radial")
    with vidaccel.apply(pipe, preset) as handle:
        run(pipe, kind)
        stats = handle.stats()
        layers = len(handle.adapter.self_attention_modules(pipe.transformer))
        per_branch = stats["cache"]["per_branch"]["transformer"]
        measured = measured_attention_calls(handle)
    assert measured == expected_attention_calls(handle, steps=4)
    for branch, log in per_branch.items():
        assert log["computed_steps"] == [0, 2, 3] and log["cached_steps"] == [1]
        assert measured[branch] == {"dense_warmup_step": layers, "dense_layer": 2, "sparse": 2 * (layers - 1)}


def test_family_parameters_come_from_the_table(tiny_pipelines):
    for name, table in COMBINED_PRESETS.items():
        for family, entry in table.items():
            preset = resolve_preset(name, family=family)
            assert preset.family == family
            assert preset.cache.budget == entry["cache"]["budget"]
            assert preset.cache.fallback.threshold == entry["cache"]["fallback"]["threshold"]
            if "attention" in entry:
                assert preset.attention.dense_warmup == entry["attention"]["dense_warmup"]
            else:
                assert preset.attention is None
    # a Preset resolved early (as `vidaccel bench` does) still gets the pipeline's family at apply time
    early = resolve_preset("fast")
    assert early.family == "wan"
    with pytest.warns(PlanWarning), vidaccel.apply(tiny_pipelines["cogvideox"], early) as handle:
        assert handle.preset.family == "cogvideox"
        expected = COMBINED_PRESETS["fast"]["cogvideox"]["cache"]["fallback"]["threshold"]
        assert handle.preset.cache.fallback.threshold == expected
    # an unknown family gets the default parameters rather than failing
    assert resolve_preset("balanced", family="ltx") == resolve_preset("balanced", family="wan")


def test_the_reference_model_ships_a_plan_for_every_combined_preset():
    """On the reference model the presets run their LeMiCa plan, never the fallback."""
    for name, table in COMBINED_PRESETS.items():
        for entry in table.values():
            cache = entry["cache"]
            LeMiCa(budget=cache["budget"], num_inference_steps=cache["num_inference_steps"]).plan_for_budget()


def test_combined_presets_are_listed():
    assert set(COMBINED) == {"quality", "balanced", "fast"} <= set(vidaccel.list_presets())


def test_presets_benchmark_smoke_replays_one_step_set(tmp_path):
    """benchmarks/bench_presets_e2e.py --smoke: every DBCache-type method computes the same replayed steps."""
    import importlib.util
    import json
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_presets_e2e.py"
    spec = importlib.util.spec_from_file_location("bench_presets_e2e", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    out = tmp_path / "presets.json"
    assert bench.main(["--smoke", "--steps", "5", "--only", "dbcache,lemica,fbc", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    records = {" ".join(r["method"].split(" ")[:2]): r for r in result["records"]}
    assert not [r for r in result["records"] if "error" in r]
    planned = result["meta"]["single_method_computed_steps"]
    assert planned == list(bench.replay_steps(5, bench.SINGLE_METHOD_FRACTION, result["meta"]["cache_warmup_steps"]))
    for name in ("vidaccel DBCache", "vidaccel LeMiCa"):
        assert records[name]["replayed"] is True and records[name]["replayed_computed_steps"] == planned
        assert records[name]["computed_steps"] == {"transformer/cond": len(planned), "transformer/uncond": len(planned)}
    # the peer runs once per work fraction it needed on the reference model, each with its own fixed step set
    peers = [r for r in result["records"] if r["method"].startswith("diffusers FirstBlockCache")]
    assert len(peers) == len(bench.PEER_FRACTIONS["fbc"])
    for record, fraction in zip(peers, bench.PEER_FRACTIONS["fbc"]):
        steps = list(bench.replay_steps(5, fraction, 1))
        assert record["replayed_computed_steps"] == steps
        assert record["computed_steps"]["decisions_compute"] == 2 * len(steps)
    assert records["dense"]["speedup"] == 1.0


def test_composed_seconds_counts_dense_sparse_and_skipped_calls():
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_presets_e2e.py"
    spec = importlib.util.spec_from_file_location("bench_presets_e2e", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    # 6 steps, computed 0, 3, 5; warm-up 4 steps: 0 and 3 dense, 5 sparse, 1, 2, 4 skipped; two calls per step
    assert bench.composed_seconds((0, 3, 5), 6, 4, 100.0, 40.0, 1.0) == pytest.approx(2 * (200 + 40 + 3) / 1000)
    assert bench.composed_seconds((0, 3, 5), 6, None, 100.0, None, 1.0) == pytest.approx(2 * 303 / 1000)


def test_candidate_preset_is_built_like_the_shipped_presets():
    from vidaccel.presets import candidate_preset

    assert candidate_preset(22, name="balanced") == resolve_preset("balanced", family="wan")
    fast, shipped_fast = candidate_preset(19, 0.5, name="fast"), resolve_preset("fast", family="wan")
    assert (fast.attention, fast.text_encoder, fast.cache.budget) == (
        shipped_fast.attention, shipped_fast.text_encoder, shipped_fast.cache.budget)
    assert candidate_preset(27, int8_text_encoder=False).text_encoder is None
