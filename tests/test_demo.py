"""The Gradio demo's callbacks, validation, preset editing, dense cache and step plot, on the tiny Wan pipeline
(2-4 steps at 32x32x9). The page itself is driven in a real browser by tests/test_demo_browser.py."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason="the demo needs gradio (pip install 'vidaccel[demo]')")

from vidaccel import DBCache, LeMiCa, list_presets  # noqa: E402
from vidaccel.commands import demo as demo_command  # noqa: E402
from vidaccel.offline_planner.plan_file import LeMiCaPlan, PlanCreation, config_fingerprint  # noqa: E402
from vidaccel.presets import resolve_preset  # noqa: E402
from vidaccel.text_encoder import TextEncoderQuant  # noqa: E402

app = demo_command.load_app()
FIELDS = app.AccelSettings.field_names()
PROMPT = "a red circle moves left over a blue background"


@pytest.fixture(scope="module")
def loaded():
    from vidaccel.runner import load_pipeline

    return load_pipeline(tiny="wan", device="cpu")


@pytest.fixture(scope="module")
def plans_dir(tmp_path_factory, loaded):
    """A plan folder laid out like assets/: a plan for the tiny Wan at 4 steps, one for another model, and a file
    that the plan glob must not pick up."""
    root = tmp_path_factory.mktemp("assets")
    (root / "tiny").mkdir()
    _plan(loaded.pipe, (0, 2), 4).to_json(root / "tiny" / "wan-lemica-b2.json")
    _plan(loaded.pipe, (0, 2), 4, fingerprints=("0123456789abcdef",)).to_json(root / "other-model-lemica.json")
    (root / "notes.json").write_text("{}")
    return root


@pytest.fixture
def demo(loaded, plans_dir, tmp_path):
    return app.VidaccelDemo(loaded, tmp_path / "videos", plans_dir=plans_dir, steps=2)


def _plan(pipe, computed_steps, num_steps, fingerprints=None):
    return LeMiCaPlan(
        transformer_classes=(type(pipe.transformer).__name__,),
        config_fingerprints=fingerprints or (config_fingerprint(pipe.transformer.config),),
        scheduler_class=type(pipe.scheduler).__name__, scheduler_config=dict(pipe.scheduler.config),
        num_inference_steps=num_steps, height=32, width=32, num_frames=9, computed_steps=tuple(computed_steps),
        error_metric=None, segments=(), prompts=(PROMPT,), creation=PlanCreation.now(["test"]),
    )


class ProgressLog:
    def __init__(self):
        self.calls: list[tuple[float, str]] = []

    def __call__(self, fraction, desc=""):
        self.calls.append((fraction, desc))


def _inputs(demo, preset="radial", *, prompt=PROMPT, steps=2, guidance=5.0, seed=0, height=32, width=32, frames=9,
            **accel):
    values = dict(zip(FIELDS, demo.on_preset_change(preset)))
    unknown = set(accel) - set(values)
    assert not unknown, unknown
    values.update(accel)
    return [prompt, preset, steps, guidance, seed, height, width, frames, *(values[name] for name in FIELDS)]


def _generate(demo, *args, **kwargs):
    progress = ProgressLog()
    outputs = demo.on_generate(*_inputs(demo, *args, **kwargs), progress=progress)
    return outputs, progress


def _gradio_error(demo, *args, **kwargs) -> str:
    with pytest.raises(gr.Error) as caught:
        _generate(demo, *args, **kwargs)
    message = caught.value.message
    assert "Traceback" not in message and 'File "' not in message
    return message


# --- sizes -----------------------------------------------------------------------------------------------------------

def test_limits_follow_the_pipeline(demo):
    limits = demo.limits
    assert (limits.spatial_multiple, limits.frame_step, limits.patch) == (16, 4, (1, 2, 2))
    assert (limits.max_height, limits.max_width, limits.max_frames) == (64, 64, 17)
    assert limits.video_tokens(32, 32, 9) == 3 * 2 * 2
    assert limits.max_video_tokens == 24  # twice the default video
    assert demo.defaults == dict(height=32, width=32, num_frames=9, num_inference_steps=2, guidance_scale=5.0)


def test_limits_are_capped_by_wan_rotary_tables(loaded):
    # rope_max_seq_len=32 positions per axis of the 2x2 patch grid: at most 32 * 16 pixels, (32 - 1) * 4 + 1 frames
    big = dict(height=4096, width=4096, num_frames=401, num_inference_steps=2, guidance_scale=5.0)
    limits = app.video_limits(loaded.pipe, big)
    assert (limits.max_height, limits.max_width, limits.max_frames) == (512, 512, 125)


@pytest.mark.parametrize("size,message", [
    (dict(height=40), "height 40 must be a positive multiple of 16"),
    (dict(width=0), "width 0 must be a positive multiple of 16"),
    (dict(height=80), "height 80 is larger than this demo allows for this model (at most 64)"),
    (dict(frames=10), "10 frames: the frame count must be 4k + 1"),
    (dict(frames=21), "21 frames are too many for this model in this demo (at most 17)"),
    (dict(height=48, frames=17), "17 frames at 32x48 make 30 video tokens; this demo allows at most 24"),
])
def test_invalid_sizes_are_messages_in_the_page(demo, size, message):
    assert message in _gradio_error(demo, **size)
    assert len(demo.dense_cache) == 0 and not list(demo.work_dir.iterdir())  # rejected before any generation


@pytest.mark.parametrize("inputs,message", [
    (dict(prompt="   "), "enter a prompt"),
    (dict(steps=0), "steps must be between 1 and 50"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(guidance=float("nan")), "guidance must be a number >= 0"),
    (dict(radial_decay=0.0), "decay must be in (0, 1]"),
    (dict(preset="dbcache", dbcache_fn=2, dbcache_bn=2), "leaves no middle blocks"),
    (dict(cache="lemica", lemica_plan=""), "choose a LeMiCa plan file"),
    (dict(cache="lemica", lemica_plan="../../etc/passwd"), "unknown LeMiCa plan"),
    (dict(attention="magic"), "unknown attention method 'magic'"),
    (dict(text_encoder="int3"), "unknown text-encoder format 'int3'"),
])
def test_invalid_settings_are_messages_in_the_page(demo, inputs, message):
    assert message in _gradio_error(demo, **inputs)


def test_unexpected_failures_are_messages_without_traceback(demo, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(app, "generate", broken)
    message = _gradio_error(demo)
    assert message == "generation failed: RuntimeError: device lost (details in the server log)"


# --- presets <-> controls --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_presets())
def test_untouched_controls_give_the_preset_back(demo, name):
    base = resolve_preset(name)
    assert demo.editor.preset_from(base, demo.editor.settings_for(base)) == base


def test_changed_knobs_replace_their_fields_only(demo):
    editor = demo.editor
    radial = resolve_preset("radial")
    settings = editor.settings_for(radial)
    assert (settings.attention, settings.radial_dense_warmup, settings.radial_decay) == ("radial", 0.25, 0.2)

    changed = editor.preset_from(radial, dataclasses.replace(settings, radial_decay=0.5, cache="dbcache",
                                                             dbcache_threshold=0.2, text_encoder="int8"))
    assert changed.name == "radial (modified)"
    assert changed.attention == dataclasses.replace(radial.attention, dense_warmup=0.25, dense_layers=1, decay=0.5)
    assert changed.cache == DBCache(Fn=None, threshold=0.2)  # Fn 0 on the page is DBCache's automatic Fn
    assert changed.text_encoder == TextEncoderQuant(method="int8")

    stock = editor.preset_from(radial, dataclasses.replace(settings, attention="none"))
    assert stock.methods() == [] and stock.name == "radial (modified)"


def test_lemica_plans_come_from_the_plan_folder(demo, plans_dir):
    assert list(demo.plans) == ["other-model-lemica.json", "tiny/wan-lemica-b2.json"]
    assert "lemica" in demo.editor.cache_choices()
    settings = dataclasses.replace(demo.editor.settings_for(resolve_preset("dense")), cache="lemica",
                                   lemica_plan="tiny/wan-lemica-b2.json", lemica_allow_rescale=True)
    preset = demo.editor.preset_from(resolve_preset("dense"), settings)
    assert preset.cache == LeMiCa(plan=str(plans_dir / "tiny" / "wan-lemica-b2.json"), allow_rescale=True)
    assert demo.editor.settings_for(preset).lemica_plan == "tiny/wan-lemica-b2.json"


def test_without_plans_lemica_is_offered_only_with_the_presets_own_config(loaded, tmp_path):
    demo = app.VidaccelDemo(loaded, tmp_path / "videos", plans_dir=tmp_path / "no-such-folder", steps=2)
    # the combined presets cache with LeMiCa (a plan where one fits the model, else their fallback): offered
    assert demo.plans == {} and "lemica" in demo.editor.cache_choices()
    fast = resolve_preset("fast")
    settings = demo.editor.settings_for(fast)
    assert settings.cache == "lemica" and demo.editor.preset_from(fast, settings).cache == fast.cache
    # from a preset without LeMiCa, choosing it needs a plan file, and there is none
    dense = resolve_preset("dense")
    with pytest.raises(app.DemoInputError, match="choose a LeMiCa plan file"):
        demo.editor.preset_from(dense, dataclasses.replace(demo.editor.settings_for(dense), cache="lemica"))


# --- generation ------------------------------------------------------------------------------------------------------

def test_generate_shows_both_videos_metrics_and_steps(demo):
    (dense_path, fast_path, metrics, figure, stats), progress = _generate(demo, "radial", steps=2)

    from vidaccel.video_io import read_video

    for path in (dense_path, fast_path):
        assert Path(path).parent == demo.work_dir
        assert read_video(path).shape == (9, 32, 32, 3)
    for label in ("Wall time", "Speedup", "PSNR vs dense", "SSIM vs dense", "Attention density", "Peak memory",
                  "Transformer calls", "Preset `radial`"):
        assert label in metrics
    speedup = float(re.search(r"\*\*([0-9.]+)×\*\*", metrics).group(1))
    cached = demo.dense_cache.get(demo.run_settings(PROMPT, 0, 2, 5.0, 32, 32, 9))
    assert cached is not None and str(cached.path) == dense_path
    assert cached.video.shape == (9, 32, 32, 3) and cached.video.dtype == np.float32
    assert speedup > 0
    assert "4 computed, 0 cached" in metrics  # 2 steps x (cond, uncond), no cache method

    assert stats["preset"] == "radial" and stats["attention"]["method"] == "radial"
    # radial's dense warm-up of 25% rounds to 0 of 2 steps: layers after the first are sparse at both steps
    assert stats["attention"]["attention_calls"]["cond"] == {"dense_layer": 2, "sparse": 6}
    assert [label.get_text() for label in figure.axes[0].get_yticklabels()] == ["transformer · cond",
                                                                                  "transformer · uncond"]
    fractions = [fraction for fraction, _ in progress.calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    descriptions = [desc for _, desc in progress.calls]
    for phase in ("warm-up (untimed): step 1/2", "accelerated: step 1/2", "accelerated: decoding", "dense: decoding"):
        assert phase in descriptions


def test_dense_run_is_cached_per_settings(demo, monkeypatch):
    _generate(demo, "radial")
    runs = []
    original = demo._timed
    monkeypatch.setattr(demo, "_timed", lambda settings, *args: runs.append(args[-1]) or original(settings, *args))

    (dense_path, _, metrics, _, _), progress = _generate(demo, "dbcache", dbcache_warmup=1, dbcache_threshold=1.0)
    assert runs == ["accelerated"] and "(cached run)" in metrics
    # stock attention at a size already warmed up: no warm-up run either
    assert not any(desc.startswith(("dense", "warm-up")) for _, desc in progress.calls)

    _generate(demo, "dbcache", seed=1)  # another seed is another dense video
    assert runs == ["accelerated", "accelerated", "dense"]
    assert len(demo.dense_cache) == 2


def test_dense_cache_keeps_the_most_recently_used():
    cache = app.DenseCache(size=2)
    keys = [app.RunSettings(PROMPT, seed, 2, 5.0, 32, 32, 9) for seed in range(3)]
    runs = [app.VideoRun(np.zeros((1, 2, 2, 3), np.float32), 1.0, None, Path(f"{i}.mp4")) for i in range(3)]
    cache.put(keys[0], runs[0])
    cache.put(keys[1], runs[1])
    assert cache.get(keys[0]) is runs[0]  # now the most recent
    cache.put(keys[2], runs[2])
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is runs[0] and len(cache) == 2


def test_dbcache_steps_in_metrics_and_plot(demo):
    (_, _, metrics, figure, stats), _ = _generate(demo, "dbcache", steps=4, dbcache_warmup=1, dbcache_threshold=10.0)
    assert "2 computed, 6 cached" in metrics and "probe" in metrics
    axes = figure.axes[0]
    computed, cached = axes.collections[0], axes.collections[1]
    assert computed.get_offsets()[:, 0].tolist() == [0]
    assert cached.get_offsets()[:, 0].tolist() == [1, 2, 3]
    assert stats["cache"]["per_branch"]["transformer"]["uncond"]["cached_steps"] == [1, 2, 3]


def test_lemica_plan_runs_and_a_plan_for_another_model_is_refused(demo):
    (_, _, metrics, _, stats), _ = _generate(demo, "dense", steps=4, cache="lemica",
                                             lemica_plan="tiny/wan-lemica-b2.json")
    assert stats["cache"]["per_branch"]["transformer"]["cond"]["computed_steps"] == [0, 2]
    assert "4 computed, 4 cached" in metrics

    message = _gradio_error(demo, "dense", steps=4, cache="lemica", lemica_plan="other-model-lemica.json")
    assert "0123456789abcdef" in message

    message = _gradio_error(demo, "dense", steps=3, cache="lemica", lemica_plan="tiny/wan-lemica-b2.json")
    assert "4" in message and "3" in message
    (_, _, metrics, _, stats), _ = _generate(demo, "dense", steps=3, cache="lemica",
                                             lemica_plan="tiny/wan-lemica-b2.json", lemica_allow_rescale=True)
    assert stats["cache"]["method"] == "lemica"
    assert "⚠️ LeMiCa plan measured for 4 steps (computing 2: [0, 2]) was rescaled to 3 steps" in metrics


def test_text_encoder_format_reports_weight_bytes(demo):
    (_, _, metrics, _, stats), _ = _generate(demo, "dense", text_encoder="int8")
    encoder = stats["text_encoder"]["text_encoder"]
    assert encoder["bytes_after"] < encoder["bytes_before"]
    assert "Text encoder weights (text_encoder)" in metrics
    assert "text encoder: **text_encoder_quant** (method=int8)" in metrics


def test_identical_videos_show_infinite_psnr(demo):
    (_, _, metrics, _, _), _ = _generate(demo, "dense", attention="none")
    assert "| PSNR vs dense | – | ∞ (identical) |" in metrics and "| SSIM vs dense | – | 1.0000 |" in metrics


def test_step_plot_without_a_cache_method_shows_every_step_computed():
    stats = {"steps": {"steps_seen": {"cond": [0, 1, 2], "uncond": [0, 1, 2]}}}
    axes = app.step_plot(stats, 3).axes[0]
    assert [c.get_offsets()[:, 0].tolist() for c in axes.collections] == [[0, 1, 2], [], [0, 1, 2], []]
    assert axes.get_title() == "Transformer calls per step"


# --- the command -----------------------------------------------------------------------------------------------------

def test_command_arguments_default_to_loopback():
    import argparse

    parser = argparse.ArgumentParser()
    demo_command.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.share, args.model, args.tiny) == ("127.0.0.1", None, False, None, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["--tiny", "wan", "--model", "x"])


def test_command_without_gradio_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert demo_command.run(object()) == 1
    assert "pip install 'vidaccel[demo]'" in capsys.readouterr().err


def test_missing_reference_model_names_tiny_and_model(monkeypatch, capsys):
    import argparse

    import vidaccel.runner

    def missing(*args, **kwargs):
        raise FileNotFoundError("the reference model assets were not found")

    monkeypatch.setattr(vidaccel.runner, "load_pipeline", missing)
    parser = argparse.ArgumentParser()
    demo_command.add_arguments(parser)
    assert app.serve(parser.parse_args([])) == 1
    err = capsys.readouterr().err
    assert "--tiny wan" in err and "--model PATH" in err and "assets were not found" in err
