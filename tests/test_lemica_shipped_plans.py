"""LeMiCa(budget=...): the plans shipped for the reference model, and picking a plan by budget."""

import shutil

import pytest
import torch

import vidaccel
from vidaccel.caching.lemica import LeMiCa, shipped_plans_dir
from vidaccel.offline_planner.plan_file import LeMiCaPlan

# The budgets the README lists, by step count.
SHIPPED_BUDGETS = {20: (*range(4, 17),), 50: (*range(9, 29), 30)}


def test_shipped_plans_cover_the_documented_budgets():
    for steps, budgets in SHIPPED_BUDGETS.items():
        for budget in budgets:
            plan = LeMiCaPlan.from_json(LeMiCa(budget=budget, num_inference_steps=steps).plan_for_budget())
            assert plan.num_inference_steps == steps and plan.budget == budget
            assert len(plan.computed_steps) == budget and plan.computed_steps[0] == 0
            assert plan.sum_error is not None  # measured, so that other step counts can match its error
    with pytest.raises(ValueError, match="several step counts.*20, 50.*num_inference_steps"):
        LeMiCa(budget=10).build()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_budget_plan_runs_on_the_reference_model():
    from vidaccel.reference import reference_pipeline

    pipe = reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    handle = vidaccel.apply(pipe, vidaccel.Preset(cache=LeMiCa(budget=10, num_inference_steps=50), name="lemica-10"))
    try:
        # A small video keeps this fast; the plan is checked against the model and the step count, not the size.
        pipe("a red circle moves left over a blue background", height=64, width=64, num_frames=5,
             num_inference_steps=50, guidance_scale=5.0, max_sequence_length=64, output_type="latent",
             generator=torch.Generator().manual_seed(0))
        stats = handle.stats()["cache"]
    finally:
        handle.remove()
    plan = LeMiCaPlan.from_json(LeMiCa(budget=10, num_inference_steps=50).plan_for_budget())
    for branch in stats["per_branch"]["transformer"].values():
        assert tuple(branch["computed_steps"]) == tuple(plan.computed_steps)


def test_missing_budget_names_the_available_ones(tmp_path):
    with pytest.raises(ValueError, match=r"no LeMiCa plan with budget 3 .*available: 4 of 20 steps, .*9 of 50 steps, 10 of 50 steps.*vidaccel plan"):
        LeMiCa(budget=3).build()
    with pytest.raises(ValueError, match="available: none"):
        LeMiCa(budget=10, plans_dir=tmp_path).build()


def test_several_step_counts_need_num_inference_steps(tmp_path):
    source = shipped_plans_dir() / "lemica-50steps-10computed.json"
    shutil.copy(source, tmp_path / "lemica-50steps-10computed.json")
    shutil.copy(source, tmp_path / "lemica-40steps-10computed.json")
    with pytest.raises(ValueError, match="several step counts.*40, 50.*num_inference_steps"):
        LeMiCa(budget=10, plans_dir=tmp_path).build()
    chosen = LeMiCa(budget=10, plans_dir=tmp_path, num_inference_steps=50).plan_for_budget()
    assert chosen.endswith("lemica-50steps-10computed.json")


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of"),
    ({"budget": 10, "computed_steps": (0, 2)}, "exactly one of"),
    ({"budget": 0}, "positive number"),
    ({"budget": 10, "num_inference_steps": 5}, ">= budget 10"),
    ({"computed_steps": (0, 2), "plans_dir": "x"}, "plans_dir goes with budget"),
])
def test_invalid_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LeMiCa(**kwargs)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fallback_runs_the_plan_where_one_fits_the_model():
    from vidaccel.reference import reference_pipeline

    pipe = reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    config = LeMiCa(budget=10, num_inference_steps=50, allow_rescale=True, fallback=vidaccel.DBCache())
    with vidaccel.apply(pipe, vidaccel.Preset(cache=config, name="planned")) as handle:
        pipe("a red circle moves left over a blue background", height=64, width=64, num_frames=5,
             num_inference_steps=25, guidance_scale=5.0, max_sequence_length=64, output_type="latent",
             generator=torch.Generator().manual_seed(0))
        stats = handle.stats()["cache"]
    assert "fallback" not in stats
    plan = LeMiCaPlan.from_json(LeMiCa(budget=10, num_inference_steps=50).plan_for_budget()).rescaled(25)
    for branch in stats["per_branch"]["transformer"].values():
        assert tuple(branch["computed_steps"]) == tuple(plan.computed_steps)


def test_fallback_runs_where_no_plan_fits_the_model(tmp_path, monkeypatch):
    from vidaccel.caching.dbcache import DBCache
    from vidaccel.offline_planner.plan_file import PlanWarning
    from vidaccel.testing import tiny_call_kwargs, tiny_pipeline

    monkeypatch.setenv("VIDACCEL_PLANS_DIR", str(tmp_path))  # searched beside the shipped plans: empty here
    pipe = tiny_pipeline("wan", num_layers=2)
    def call():
        return {**tiny_call_kwargs("wan", steps=6), "output_type": "latent"}  # a fresh seeded generator each time

    dense = pipe(**call()).frames
    config = LeMiCa(budget=10, fallback=DBCache(Fn=1, Bn=0, threshold=1e9, warmup_steps=2))
    with pytest.warns(PlanWarning, match="no LeMiCa plan with budget 10 for this model.*vidaccel plan"):
        handle = vidaccel.apply(pipe, vidaccel.Preset(cache=config, name="fallback"))
    try:
        pipe(**call())
        stats = handle.stats()["cache"]
    finally:
        handle.remove()
    assert stats["fallback"]["method"] == "dbcache"
    assert stats["cached"] > 0  # the fallback DBCache ran (its threshold caches every step after warm-up)
    assert torch.equal(pipe(**call()).frames, dense)  # removed without a trace


def test_fallback_needs_a_budget_and_a_cache_method():
    with pytest.raises(ValueError, match="fallback goes with budget"):
        LeMiCa(computed_steps=(0, 2), fallback=vidaccel.DBCache())
    with pytest.raises(TypeError, match="cache method config"):
        LeMiCa(budget=10, fallback=vidaccel.RadialAttention())


def test_fallback_runs_where_the_only_plan_was_measured_on_other_weights(tmp_path, perturb_weights):
    from vidaccel.caching.dbcache import DBCache
    from vidaccel.offline_planner.plan_file import PlanCreation, PlanWarning, config_fingerprint, plan_filename
    from vidaccel.offline_planner.weights_signature import weights_signature
    from vidaccel.testing import tiny_call_kwargs, tiny_pipeline

    pipe = tiny_pipeline("wan", num_layers=2)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    LeMiCaPlan(
        transformer_classes=(type(transformer).__name__,),
        config_fingerprints=(config_fingerprint(transformer.config),),
        scheduler_class=type(pipe.scheduler).__name__, scheduler_config=dict(pipe.scheduler.config),
        num_inference_steps=6, height=32, width=32, num_frames=9, computed_steps=(0, 2, 4), error_metric=None,
        segments=(), prompts=("a red circle",), creation=PlanCreation.now(["test"]),
        weights_signatures=(weights_signature(transformer),),
    ).to_json(tmp_path / plan_filename(6, 3))
    config = LeMiCa(budget=3, plans_dir=tmp_path, fallback=DBCache(Fn=1, Bn=0, threshold=1e9, warmup_steps=2))

    def run():
        with vidaccel.apply(pipe, vidaccel.Preset(cache=config, name="planned")) as handle:
            pipe(**{**tiny_call_kwargs("wan", steps=6), "output_type": "latent"})
            return handle.stats()["cache"]

    stats = run()  # on the weights it was measured on, the plan runs
    assert "fallback" not in stats and stats["plan_steps"] == {"6": [0, 2, 4]}

    perturb_weights(transformer, weights_signature(transformer)[-1][0])  # retrained: same architecture
    with pytest.warns(PlanWarning, match=r"a LeMiCa plan with budget 3 exists for this architecture .* but it was "
                                         r"measured on other weights .*proj_out.weight.*running the fallback"):
        stats = run()
    assert stats["fallback"]["method"] == "dbcache" and "other weights" in stats["fallback"]["reason"]


def _tiny_plan(pipe, steps: int, computed: tuple[int, ...], fingerprint: str | None = None,
               errors: tuple[float, ...] | None = None):
    """A plan for the tiny pipeline; ``errors``: one measured relative-L1 error per segment (else unmeasured)."""
    from vidaccel.offline_planner.plan_file import PlanCreation, PlanSegment, config_fingerprint
    from vidaccel.offline_planner.weights_signature import weights_signature

    transformer = pipe.transformer
    segments = () if errors is None else tuple(
        PlanSegment(start, end, error) for start, end, error in zip(computed, (*computed[1:], steps), errors))
    return LeMiCaPlan(
        transformer_classes=(type(transformer).__name__,),
        config_fingerprints=(fingerprint or config_fingerprint(transformer.config),),
        scheduler_class=type(pipe.scheduler).__name__, scheduler_config=dict(pipe.scheduler.config),
        num_inference_steps=steps, height=32, width=32, num_frames=9, computed_steps=computed,
        error_metric=None if errors is None else "relative_l1", segments=segments, prompts=("a red circle",),
        creation=PlanCreation.now(["test"]),
        weights_signatures=(weights_signature(transformer),),
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rescaled_budget_prefers_a_plan_measured_for_the_run_step_count(tmp_path):
    """Budget 6 of 12 run at 6 steps: the plan measured for 3 of 6 steps on this model wins over stretching; a
    6-step plan made for another model is ignored, and the 12-step plan is stretched."""
    from vidaccel.offline_planner.plan_file import plan_filename
    from vidaccel.testing import tiny_call_kwargs, tiny_pipeline

    pipe = tiny_pipeline("wan", num_layers=2)
    pipe.set_progress_bar_config(disable=True)
    _tiny_plan(pipe, 12, (0, 2, 4, 6, 8, 10)).to_json(tmp_path / plan_filename(12, 6))
    config = LeMiCa(budget=6, num_inference_steps=12, allow_rescale=True, plans_dir=tmp_path)

    def run(steps):
        with vidaccel.apply(pipe, vidaccel.Preset(cache=config, name="planned")) as handle:
            pipe(**{**tiny_call_kwargs("wan", steps=steps), "output_type": "latent"})
            return handle.stats()["cache"]

    _tiny_plan(pipe, 6, (0, 1, 3), fingerprint="another-model").to_json(tmp_path / plan_filename(6, 3))
    stats = run(6)
    assert stats["plan_steps"] == {"6": [0, 2, 4]}  # the stretch of (0, 2, ..., 10)
    assert stats["plan_sources"]["6"].startswith("stretched from 6 of 12 steps")

    _tiny_plan(pipe, 6, (0, 1, 3)).to_json(tmp_path / plan_filename(6, 3))
    stats = run(6)
    assert stats["plan_steps"] == {"6": [0, 1, 3]}
    assert stats["plan_sources"] == {"6": "plan measured for 6 steps (lemica-6steps-3computed.json; same share of "
                                          "steps as the 6 of 12 steps plan)"}
    stats = run(12)
    assert stats["plan_steps"] == {"12": [0, 2, 4, 6, 8, 10]}
    assert stats["plan_sources"] == {"12": "plan measured for 12 steps"}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rescaled_budget_matches_the_measured_error_not_the_share_of_steps(tmp_path):
    """With measured errors, a run at another step count takes the fewest computed steps whose summed error is no
    larger than the budget plan's (here 4 of 6, not the same share 3 of 6); with none that good, the most accurate."""
    from vidaccel.offline_planner.plan_file import plan_filename
    from vidaccel.testing import tiny_call_kwargs, tiny_pipeline

    pipe = tiny_pipeline("wan", num_layers=2)
    pipe.set_progress_bar_config(disable=True)
    _tiny_plan(pipe, 12, (0, 2, 4, 6, 8, 10), errors=(0.01,) * 6).to_json(tmp_path / plan_filename(12, 6))
    _tiny_plan(pipe, 6, (0, 1, 3), errors=(0.0, 0.05, 0.04)).to_json(tmp_path / plan_filename(6, 3))
    _tiny_plan(pipe, 6, (0, 1, 2, 4), errors=(0.0, 0.0, 0.02, 0.02)).to_json(tmp_path / plan_filename(6, 4))
    _tiny_plan(pipe, 6, (0, 1, 2, 3, 4), errors=(0.0, 0.0, 0.0, 0.0, 0.03)).to_json(tmp_path / plan_filename(6, 5))
    config = LeMiCa(budget=6, num_inference_steps=12, allow_rescale=True, plans_dir=tmp_path)

    def run(steps):
        with vidaccel.apply(pipe, vidaccel.Preset(cache=config, name="planned")) as handle:
            pipe(**{**tiny_call_kwargs("wan", steps=steps), "output_type": "latent"})
            return handle.stats()["cache"]

    stats = run(6)
    assert stats["plan_steps"] == {"6": [0, 1, 2, 4]}
    assert stats["plan_sources"]["6"] == ("plan measured for 6 steps (lemica-6steps-4computed.json; error 0.04 <= "
                                          "0.06 of the 6 of 12 steps plan)")
    (tmp_path / plan_filename(6, 4)).unlink()
    _tiny_plan(pipe, 6, (0, 1, 2, 3, 4), errors=(0.0, 0.0, 0.0, 0.0, 0.07)).to_json(tmp_path / plan_filename(6, 5))
    stats = run(6)
    assert stats["plan_steps"] == {"6": [0, 1, 2, 3, 4]}
    assert stats["plan_sources"]["6"] == ("plan measured for 6 steps (lemica-6steps-5computed.json; the most accurate "
                                          "measured; error 0.07 > 0.06 of the 6 of 12 steps plan)")
