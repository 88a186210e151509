"""`vidaccel tune`: the grid, the floor, and an end-to-end run on a tiny pipeline."""

import json
import math
import re

import pytest

import vidaccel
from vidaccel.cli import main
from vidaccel.metrics import psnr, ssim
from vidaccel.runner import accelerated, generate, load_pipeline
from vidaccel.tune import QualityFloor, TuneGrid, even_plan

PROMPT = "a red circle moves left over a blue background"
SMALL = ["--tiny", "wan", "--device", "cpu", "--steps", "4", "--height", "64", "--width", "64", "--num-prompts", "1",
         "--warmup-steps", "1", "--radial-block-size", "64"]


def test_even_plan_spreads_steps_and_keeps_ends():
    plan = even_plan(10, 0.5)
    assert plan[0] == 0 and plan[-1] == 9 and len(plan) == 5 and list(plan) == sorted(set(plan))
    assert even_plan(4, 1.0) == (0, 1, 2, 3) and even_plan(1, 0.5) == (0,) and even_plan(8, 0.01) == (0, 7)


def test_grid_is_every_combination_but_the_stock_pipeline():
    grid = TuneGrid(radial_warmups=(0.25,), dbcache_thresholds=(0.1,), lemica_budgets=(0.5, 1.0),
                    text_encoders=(None, "int8"))
    candidates = grid.candidates(steps=10)
    # attention {stock, radial} x cache {none, dbcache, lemica 5/10 (the 10/10 plan is no cache)} x {stock, int8}
    assert len(candidates) == 2 * 3 * 2 - 1
    names = [name for name, _ in candidates]
    assert len(set(names)) == len(names) and "radial(warmup=0.25)+dbcache(t=0.1)+int8" in names
    assert all(preset.methods() for _, preset in candidates)
    lemica = next(p.cache for n, p in candidates if n == "lemica(5/10)")
    assert lemica.computed_steps == even_plan(10, 0.5) and lemica.num_inference_steps == 10
    assert next(p.cache for n, p in candidates if n == "dbcache(t=0.1)").warmup_steps == 2  # 20% of 10 steps
    with pytest.raises(ValueError, match="warm-up fractions must be in \\[0, 1\\)"):
        TuneGrid(radial_warmups=(1.5,))


def test_floor():
    assert QualityFloor(28).met_by(math.inf, None) and not QualityFloor(28).met_by(27.9, 1.0)
    assert not QualityFloor(28).met_by(math.nan, None)
    assert not QualityFloor(28, 0.9).met_by(30, 0.8) and QualityFloor(28, 0.9).met_by(30, 0.95)


def test_tune_writes_a_preset_that_loads_and_meets_its_floor(tmp_path, capsys):
    out = tmp_path / "tuned.json"
    code = main(["tune", *SMALL, "--radial-warmups", "0.25", "--dbcache-thresholds", "0.15",
                 "--lemica-budgets", "0.5", "--text-encoders", "none", "--min-psnr", "25", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "<- chosen" in printed and "dense (stock)" in printed
    data = json.loads(out.read_text())
    measured = data["measured"]
    assert data["vidaccel_preset"] == 1 and data["created"]["by"] == "vidaccel tune" and data["family"] == "wan"
    assert measured["psnr_min"] >= 25 and measured["floor"]["min_psnr"] == 25
    assert len(measured["candidates"]) == 5 and measured["prompts"] == [PROMPT]
    fastest = min((c for c in measured["candidates"] if c["meets_floor"]), key=lambda c: c["seconds"])
    assert fastest["candidate"] == data["created"]["candidate"]

    # the file loads through vidaccel.apply and meets its floor on the prompt it was tuned on
    loaded = load_pipeline(tiny="wan", device="cpu")
    call = dict(num_inference_steps=4, height=64, width=64)
    dense = generate(loaded, PROMPT, seed=0, progress=False, **call)
    with accelerated(loaded.pipe, str(out)) as handle:
        assert handle.preset.name == "tuned"
        fast = generate(loaded, PROMPT, seed=0, progress=False, **call)
    assert psnr(dense.video, fast.video) >= 25
    assert psnr(dense.video, fast.video) == pytest.approx(measured["psnr_min"], rel=1e-4)
    assert ssim(dense.video, fast.video) == pytest.approx(measured["ssim_min"], rel=1e-4)
    assert vidaccel.load_preset_file(out).name == "tuned"


def test_impossible_floor_names_the_best_psnr(tmp_path, capsys):
    out = tmp_path / "never.json"
    code = main(["tune", *SMALL, "--radial-warmups", "", "--dbcache-thresholds", "", "--lemica-budgets", "0.5",
                 "--text-encoders", "none", "--min-psnr", "1000", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and not out.exists()
    match = re.search(r"no candidate meets the floor \(PSNR >= 1000 dB on every prompt and seed\): the best PSNR "
                      r"found was (\d+\.\d\d) dB .* by lemica\(2/4\)", captured.err)
    assert match, captured.err
    assert 0 < float(match.group(1)) < 1000
