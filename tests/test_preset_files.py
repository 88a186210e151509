"""Preset files: versioned JSON <-> Preset, strict reading, `vidaccel.apply(pipe, "preset.json")`."""

import dataclasses
import importlib.util
import json

import pytest
import torch

import vidaccel
from vidaccel import DBCache, LeMiCa, Preset, RadialAttention, TextEncoderQuant
from vidaccel.preset_files import (PresetFileError, config_from_dict, method_registry, preset_to_dict,
                                   read_preset_file)
from vidaccel.presets import resolve_preset
from vidaccel.testing import tiny_call_kwargs


def every_method_preset():
    return Preset(attention=RadialAttention(dense_warmup=2, dense_layers=0, block_size=64, decay=0.3),
                  cache=LeMiCa(computed_steps=[0, 2, 3], num_inference_steps=4),
                  text_encoder=TextEncoderQuant(method="int4", group_size=32, skip_modules=["*norm*"]),
                  name="everything")


def write(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("name", vidaccel.list_presets())
def test_named_presets_round_trip(tmp_path, name):
    preset = resolve_preset(name)
    path = vidaccel.save_preset_file(tmp_path / f"{name}.json", preset, measured={"psnr": float("inf")})
    loaded = read_preset_file(path)
    assert loaded.preset == preset and loaded.preset.name == name and loaded.preset.family == preset.family
    assert loaded.measured == {"psnr": "inf"}  # strict JSON: non-finite numbers become strings
    json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))


def test_every_field_round_trips_with_provenance(tmp_path):
    preset = every_method_preset()
    path = vidaccel.save_preset_file(tmp_path / "sub" / "p.json", preset, created={"by": "test"},
                                     measured={"speedup": 1.5})
    data = json.loads(path.read_text())
    assert data["vidaccel_preset"] == 1
    assert {k: data["cache"][k] for k in ("method", "computed_steps", "num_inference_steps", "plan")} == \
        {"method": "lemica", "computed_steps": [0, 2, 3], "num_inference_steps": 4, "plan": None}
    assert data["text_encoder"]["method"] == "text_encoder_quant" and data["text_encoder"]["format"] == "int4"
    assert data["created"]["by"] == "test" and data["created"]["vidaccel"] == vidaccel.__version__
    loaded = read_preset_file(path)
    assert loaded.preset == preset
    assert loaded.preset.cache.computed_steps == (0, 2, 3) and loaded.preset.text_encoder.skip_modules == ("*norm*",)
    assert loaded.measured == {"speedup": 1.5}
    assert Preset.from_dict(data) == preset


def test_missing_fields_take_defaults():
    preset = Preset.from_dict({"vidaccel_preset": 1, "name": "short", "cache": {"method": "dbcache"}})
    assert preset == Preset(cache=DBCache(), name="short") and preset.attention is None


def test_registry_discovers_every_config_by_name():
    registry = method_registry()
    assert registry["attention"]["radial"] is RadialAttention
    assert registry["attention"]["dense"] is vidaccel.DenseAttention
    assert registry["cache"] == {"dbcache": DBCache, "lemica": LeMiCa, **{
        k: v for k, v in registry["cache"].items() if k not in ("dbcache", "lemica")}}
    assert registry["text_encoder"]["text_encoder_quant"] is TextEncoderQuant
    if importlib.util.find_spec("vidaccel.attention.svg2") is not None:
        from vidaccel.attention.svg2 import SVG2Attention

        assert registry["attention"][SVG2Attention.name] is SVG2Attention


def test_a_subclass_reusing_a_name_does_not_shadow_the_library_class():
    @dataclasses.dataclass(frozen=True)
    class TimedRadial(RadialAttention):  # like a benchmark's timing wrapper
        pass

    assert method_registry()["attention"]["radial"] is RadialAttention


@pytest.mark.parametrize("data,message", [
    ({"name": "x"}, "not a vidaccel preset \\(no 'vidaccel_preset' key\\)"),
    ({"vidaccel_preset": 2}, "schema version 2 is not supported; this vidaccel reads version 1"),
    ({"vidaccel_preset": 1, "atention": None}, "unknown key\\(s\\) 'atention'; valid keys: vidaccel_preset, name"),
    ({"vidaccel_preset": 1, "attention": {"method": "flash"}},
     "unknown attention method 'flash'; valid attention methods: dense, radial"),
    ({"vidaccel_preset": 1, "cache": {"method": "radial"}}, "unknown cache method 'radial'; valid cache methods: "),
    ({"vidaccel_preset": 1, "cache": {"method": "dbcache", "thresh": 0.1}},
     "unknown field 'thresh' for cache method 'dbcache'; valid fields: Fn, Bn, threshold, warmup_steps"),
    ({"vidaccel_preset": 1, "cache": {"threshold": 0.1}}, "'cache' has no \"method\"; valid cache methods: dbcache"),
    ({"vidaccel_preset": 1, "cache": {"method": "dbcache", "threshold": -1}},
     "invalid cache method 'dbcache': DBCache threshold must be a finite number >= 0"),
    ({"vidaccel_preset": 1, "text_encoder": {"method": "text_encoder_quant", "format": "int3"}},
     "unknown text-encoder method 'int3'"),
    ({"vidaccel_preset": 1, "attention": "radial"}, "'attention' must be an object"),
    ({"vidaccel_preset": 1, "name": ""}, "\"name\" must be a non-empty string"),
    ({"vidaccel_preset": 1, "measured": [1]}, "'measured' must be an object"),
])
def test_clear_errors(tmp_path, data, message):
    path = write(tmp_path / "bad.json", data)
    with pytest.raises(PresetFileError, match=message):
        vidaccel.load_preset_file(path)


def test_unknown_field_names_the_valid_text_encoder_format_key():
    with pytest.raises(PresetFileError, match="valid fields: format, group_size"):
        config_from_dict("text_encoder", {"method": "text_encoder_quant", "bits": 8})


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="preset file .*nope.json' does not exist"):
        resolve_preset(str(tmp_path / "nope.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(PresetFileError, match="not valid JSON"):
        resolve_preset(tmp_path / "broken.json")


def test_resolve_accepts_paths_names_win(tmp_path, monkeypatch):
    data = preset_to_dict(Preset(cache=DBCache(threshold=0.3), name="from-file"))
    no_suffix = write(tmp_path / "my_preset", data)
    assert resolve_preset(str(no_suffix)).cache == DBCache(threshold=0.3)  # an existing file, any suffix
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "radial", data)
    assert resolve_preset("radial").name == "radial"  # a preset name beats a file of the same name
    with pytest.raises(ValueError, match="unknown vidaccel preset 'turbo'.*preset .json file"):
        resolve_preset("turbo")


def test_apply_with_a_preset_file_runs_that_preset(tmp_path, tiny_pipelines):
    pipe = tiny_pipelines["wan"]
    preset = Preset(attention=RadialAttention(dense_warmup=1, dense_layers=0, block_size=64),
                    cache=DBCache(threshold=1e9, warmup_steps=2), name="file-test")
    path = vidaccel.save_preset_file(tmp_path / "file-test.json", preset)
    call = {**tiny_call_kwargs("wan", steps=4), "height": 64, "width": 64, "output_type": "latent"}
    pipe.set_progress_bar_config(disable=True)
    with vidaccel.apply(pipe, preset):
        expected = pipe(**{**call, "generator": torch.Generator().manual_seed(0)}).frames
    with vidaccel.apply(pipe, str(path)) as handle:
        got = pipe(**{**call, "generator": torch.Generator().manual_seed(0)}).frames
        stats = handle.stats()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert stats["preset"] == "file-test" and stats["cache"]["cached"] > 0
    assert sum(c.get("sparse", 0) for c in stats["attention"]["attention_calls"].values()) > 0
