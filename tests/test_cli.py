"""The `vidaccel` command on tiny pipelines: info, generate (playable mp4), bench (JSON, markdown, PNG)."""

import json

import pytest

from vidaccel.cli import main
from vidaccel.video_io import read_video


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "dense" in info["presets"] and "WanPipeline" in info["supported_pipelines"]
    assert info["kernel_backend"] in ("triton-cuda", "triton-interpreter", "torch-reference")


def test_generate_writes_playable_mp4_and_comparison(tmp_path, capsys):
    out = tmp_path / "video.mp4"
    report = tmp_path / "report.json"
    assert main(["generate", "a red circle moves left", "--preset", "dense", "--tiny", "wan", "--steps", "2",
                 "--warmup-steps", "1", "--out", str(out), "--json", str(report)]) == 0
    frames = read_video(out)
    assert frames.shape == (9, 32, 32, 3)
    assert read_video(tmp_path / "video_dense_vs_accelerated.mp4").shape == (9, 32, 64, 3)
    result = json.loads(report.read_text())
    assert result["psnr"] == "inf" and result["ssim"] == pytest.approx(1.0)
    assert "speedup" in capsys.readouterr().out


def test_generate_rejects_unknown_preset_before_loading(capsys):
    with pytest.raises(ValueError, match="unknown vidaccel preset 'nope'"):
        main(["generate", "x", "--preset", "nope", "--tiny", "wan"])


def test_bench_writes_json_markdown_plot_and_is_reproducible(tmp_path):
    def bench(folder):
        assert main(["bench", "--tiny", "cogvideox", "--presets", "dense", "--num-prompts", "1", "--seeds", "0,1",
                     "--steps", "2", "--warmup-steps", "1", "--out", str(folder)]) == 0
        return json.loads((folder / "results.json").read_text())

    first, second = bench(tmp_path / "a"), bench(tmp_path / "b")
    record = first["records"][0]
    assert record["preset"] == "dense" and len(record["runs"]) == 2 and record["speedup"] > 0
    assert record["psnr"] == "inf"
    assert "| dense |" in (tmp_path / "a" / "results.md").read_text()
    assert (tmp_path / "a" / "speed_vs_quality.png").read_bytes()[:4] == b"\x89PNG"
    strip = lambda rec: [{k: v for k, v in run.items() if "seconds" not in k} for run in rec["runs"]]  # noqa: E731
    assert strip(record) == strip(second["records"][0])


def test_warm_up_silences_plan_warnings_of_its_short_run_only(monkeypatch):
    import warnings

    from vidaccel import runner
    from vidaccel.offline_planner.plan_file import PlanWarning

    calls = []

    def fake_generate(loaded, prompt, *, seed=0, progress=True, **overrides):
        calls.append(overrides)
        warnings.warn("plan rescaled to 2 steps", PlanWarning)
        warnings.warn("something else", UserWarning)

    monkeypatch.setattr(runner, "generate", fake_generate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner.warm_up(None, "a prompt", seed=3, steps=2, height=64)
        assert [type(w.message) for w in caught] == [UserWarning]
        runner.generate(None, "a prompt")  # the timed run keeps its plan warnings
        assert PlanWarning in [type(w.message) for w in caught]
    assert calls[0] == {"height": 64, "num_inference_steps": 2}


def test_generate_prints_the_step_plan_of_the_timed_run(tmp_path, capsys):
    preset = tmp_path / "planned.json"
    preset.write_text(json.dumps({"vidaccel_preset": 1, "name": "planned",
                                  "cache": {"method": "lemica", "computed_steps": [0]}}))
    assert main(["generate", "a red circle moves left", "--preset", str(preset), "--tiny", "wan", "--steps", "4",
                 "--warmup-steps", "1", "--no-compare", "--out", str(tmp_path / "video.mp4")]) == 0
    out = capsys.readouterr().out
    assert "LeMiCa plan  1 of 4 steps computed (the given computed_steps)" in out
    assert "of 1 steps" not in out  # not the warm-up's
