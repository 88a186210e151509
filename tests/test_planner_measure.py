"""LeMiCa planner, pipeline side: segment errors through the LeMiCa runtime, and resumable checkpoints."""

import json

import pytest

from vidaccel.offline_planner import measure
from vidaccel.offline_planner.measure import (
    CheckpointMismatchError,
    EdgeMeasurements,
    candidate_edges,
    measure_edge,
    measure_edges,
    segment_computed_steps,
    segment_errors,
)
from vidaccel.offline_planner.trajectories import prompt_runs, record_trajectories
from vidaccel.testing import tiny_call_kwargs, tiny_pipeline

STEPS = 6


def planner_kwargs(kind):
    kwargs = tiny_call_kwargs(kind, steps=STEPS)
    for key in ("prompt", "generator", "num_inference_steps", "output_type"):
        kwargs.pop(key)
    return kwargs


@pytest.fixture(scope="module")
def small_wan():
    """One transformer block: segment measurement runs many generations, and the block count changes nothing."""
    return tiny_pipeline("wan", num_layers=1)


@pytest.fixture(scope="module")
def wan_setup(small_wan):
    pipe, kwargs = small_wan, planner_kwargs("wan")
    runs = prompt_runs(["a red circle moves left", "a green square runs up"], seed=3)
    return pipe, kwargs, record_trajectories(pipe, runs, STEPS, kwargs, progress=False)


def test_candidate_edges_and_segment_plans():
    assert candidate_edges(4, 1) == [(0, 2), (1, 3), (2, 4)]
    assert candidate_edges(4, 2) == [(0, 2), (0, 3), (1, 3), (1, 4), (2, 4)]
    assert candidate_edges(3, 0) == []
    assert segment_computed_steps(6, 2, 5) == (0, 1, 2, 5)
    assert segment_computed_steps(6, 3, 6) == (0, 1, 2, 3)
    assert segment_computed_steps(6, 0, 1) == tuple(range(6))
    with pytest.raises(ValueError):
        segment_computed_steps(6, 4, 7)


def test_zero_skip_segments_are_exact_and_skips_cost_something(wan_setup):
    pipe, kwargs, trajectories = wan_setup
    for start in (0, 3, STEPS - 1):  # nothing reused: the runtime computes every step, bitwise dense
        errors = measure_edge(pipe, trajectories, start, start + 1, kwargs)
        assert errors == {"relative_l1": [0.0, 0.0], "mean_l1": [0.0, 0.0]}
    for start, end in [(0, 2), (1, 4), (3, STEPS)]:
        errors = measure_edge(pipe, trajectories, start, end, kwargs)
        assert set(errors) == {"relative_l1", "mean_l1"}
        assert all(value > 0 for values in errors.values() for value in values)
        assert len(errors["relative_l1"]) == len(trajectories)


def test_decoded_video_metric(small_wan):
    pipe, kwargs = small_wan, planner_kwargs("wan")
    trajectories = record_trajectories(pipe, prompt_runs(["a blue ball"]), STEPS, kwargs, decode=True, progress=False)
    dense = trajectories[0]
    assert segment_errors(dense, dense.final_latent, dense.final_video) == {
        "relative_l1": 0.0, "mean_l1": 0.0, "video_mse": 0.0}
    skipped = measure_edge(pipe, trajectories, 2, 5, kwargs)
    assert skipped["video_mse"][0] > 0 and skipped["relative_l1"][0] > 0
    with pytest.raises(ValueError, match="was not decoded"):
        segment_errors(dense, dense.final_latent, None)


def test_interrupted_measurement_resumes_without_remeasuring(wan_setup, tmp_path, monkeypatch):
    pipe, kwargs, trajectories = wan_setup
    trajectories = trajectories[:1]
    edges = candidate_edges(STEPS, 1)
    reference = measure_edges(pipe, trajectories, edges, kwargs, progress=False)
    assert set(reference.errors) == set(edges)

    measured = []
    original = measure.measure_edge

    def counting(pipe_, trajectories_, start, end, kwargs_):
        if len(measured) == 3:
            raise KeyboardInterrupt  # the user stops the run after three segments
        measured.append((start, end))
        return original(pipe_, trajectories_, start, end, kwargs_)

    monkeypatch.setattr(measure, "measure_edge", counting)
    checkpoint = tmp_path / "edges.json"
    with pytest.raises(KeyboardInterrupt):
        measure_edges(pipe, trajectories, edges, kwargs, checkpoint=checkpoint, progress=False)
    assert set(EdgeMeasurements.load(checkpoint).errors) == set(measured) == set(edges[:3])

    measured.clear()
    monkeypatch.setattr(measure, "measure_edge", lambda *a: measured.append(a[2:4]) or original(*a))
    resumed = measure_edges(pipe, trajectories, edges, kwargs, checkpoint=checkpoint, progress=False)
    assert measured == edges[3:]
    assert resumed.errors == reference.errors  # deterministic on the CPU: identical numbers
    assert resumed.mean_errors("relative_l1") == reference.mean_errors("relative_l1")

    measured.clear()
    again = measure_edges(pipe, trajectories, edges[:2], kwargs, checkpoint=checkpoint, progress=False)
    assert measured == [] and again.errors == reference.errors


def test_checkpoint_of_other_conditions_is_refused(wan_setup, tmp_path):
    pipe, kwargs, trajectories = wan_setup
    checkpoint = tmp_path / "edges.json"
    measure_edges(pipe, trajectories[:1], [(0, 2)], kwargs, checkpoint=checkpoint, progress=False)
    with pytest.raises(CheckpointMismatchError, match="prompts or seeds differ"):
        measure_edges(pipe, trajectories, [(0, 2)], kwargs, checkpoint=checkpoint, progress=False)

    data = json.loads(checkpoint.read_text())
    data["setting"]["call"]["guidance_scale"] = 1.0
    checkpoint.write_text(json.dumps(data))
    with pytest.raises(CheckpointMismatchError, match="call"):
        measure_edges(pipe, trajectories[:1], [(0, 2)], kwargs, checkpoint=checkpoint, progress=False)


def test_checkpoint_of_other_weights_is_refused_and_one_without_signatures_is_resumed(wan_setup, tmp_path,
                                                                                      monkeypatch):
    pipe, kwargs, trajectories = wan_setup
    checkpoint = tmp_path / "edges.json"
    measured = measure_edges(pipe, trajectories[:1], [(0, 2)], kwargs, checkpoint=checkpoint, progress=False)
    data = json.loads(checkpoint.read_text())
    signature = data["setting"]["weights_signatures"][0]
    assert len(signature) == 16 and signature == measured.setting["weights_signatures"][0]

    name, value = signature[3]
    signature[3] = [name, value * 1.05]  # the same architecture, retrained
    checkpoint.write_text(json.dumps(data))
    with pytest.raises(CheckpointMismatchError, match=rf"weights_signatures: other weights .*RMS of {name}"):
        measure_edges(pipe, trajectories[:1], [(0, 2)], kwargs, checkpoint=checkpoint, progress=False)

    del data["setting"]["weights_signatures"]  # written before weights signatures existed
    checkpoint.write_text(json.dumps(data))
    monkeypatch.setattr(measure, "measure_edge", lambda *args: pytest.fail("a checkpointed edge was measured"))
    resumed = measure_edges(pipe, trajectories[:1], [(0, 2)], kwargs, checkpoint=checkpoint, progress=False)
    assert resumed.errors == measured.errors
    assert resumed.setting["weights_signatures"] == measured.setting["weights_signatures"]  # the pipeline's own


def test_measurement_file_round_trip_and_mean(wan_setup, tmp_path):
    _, _, trajectories = wan_setup
    measurements = EdgeMeasurements({**trajectories[0].setting, "decode": False}, tuple(t.run for t in trajectories))
    measurements.errors[(0, 2)] = {"relative_l1": [0.1, 0.3], "mean_l1": [1.0, 2.0]}
    measurements.save(tmp_path / "m.json")
    loaded = EdgeMeasurements.load(tmp_path / "m.json")
    assert loaded == measurements
    assert loaded.mean_errors("relative_l1") == {(0, 2): pytest.approx(0.2)}
    assert loaded.mean_errors("mean_l1") == {(0, 2): 1.5}
    with pytest.raises(ValueError, match="decoded-video metrics need"):
        loaded.mean_errors("video_mse")
    (tmp_path / "bad.json").write_text('{"schema": "something else"}')
    with pytest.raises(ValueError, match="malformed LeMiCa edge measurements"):
        EdgeMeasurements.load(tmp_path / "bad.json")
