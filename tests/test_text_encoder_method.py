"""TextEncoderQuant as a vidaccel method: quantized encoders in the pipeline, the prompt cache, exact removal."""

import pytest
import torch

import vidaccel
from vidaccel.text_encoder import TextEncoderQuant
from vidaccel.testing import tiny_call_kwargs


def run(pipe, kind, **kw):
    return pipe(**{**tiny_call_kwargs(kind, steps=2, **kw), "output_type": "latent"}).frames


def state(module):
    return {name: t.clone() for name, t in module.state_dict().items()}


@pytest.mark.parametrize("kind", ["wan", "hunyuan", "cogvideox"])
def test_quantized_encoders_run_cache_prompts_and_restore_bit_exact(kind, tiny_pipelines):
    pipe = tiny_pipelines[kind]
    stock = run(pipe, kind)
    encoders = {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None)}
    before = {name: state(enc) for name, enc in encoders.items()}
    children = {name: [id(m) for m in enc.modules()] for name, enc in encoders.items()}

    forward_calls = []
    probe = next(iter(encoders.values())).register_forward_pre_hook(lambda *_: forward_calls.append(1))
    with vidaccel.apply(pipe, vidaccel.Preset(text_encoder=TextEncoderQuant(method="int8"))) as handle:
        first = run(pipe, kind)
        stats = handle.stats()["text_encoder"]
        encoded_first = len(forward_calls)
        second = run(pipe, kind)
        stats2 = handle.stats()["text_encoder"]
    probe.remove()
    for name in encoders:
        assert stats[name]["bytes_after"] < stats[name]["bytes_before"]
        assert stats[name]["quantized_linear_layers"] > 0
        assert stats2[name]["prompt_cache_hits"] > stats[name]["prompt_cache_hits"]
        assert stats2[name]["prompt_cache_misses"] == stats[name]["prompt_cache_misses"]
    # the hook's forward is the encoder's forward: the second generation reached no encoder layer
    assert encoded_first > 0
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    assert torch.isfinite(first).all()
    # int8 weights: close to the full-precision pipeline, not identical
    assert (first - stock).abs().mean() < 0.1 * stock.abs().mean()

    for name, enc in encoders.items():
        after = state(enc)
        assert after.keys() == before[name].keys()
        for key in after:
            assert torch.equal(after[key], before[name][key]), key
        assert [id(m) for m in enc.modules()] == children[name]
        assert "forward" not in enc.__dict__
    torch.testing.assert_close(run(pipe, kind), stock, atol=0, rtol=0)


def test_cache_invalidated_on_remove_and_composes_with_radial(tiny_pipelines):
    pipe = tiny_pipelines["wan"]
    preset = vidaccel.Preset(attention=vidaccel.RadialAttention(block_size=64, dense_warmup=0, dense_layers=0),
                             text_encoder=TextEncoderQuant(method="int4", group_size=32))
    with vidaccel.apply(pipe, preset) as handle:
        run(pipe, "wan")
        method = handle.methods[0]
        assert any(cache.entries for cache in method.caches.values())
    assert not any(cache.entries for cache in method.caches.values())
    with vidaccel.apply(pipe, preset) as handle:  # a fresh install starts with an empty cache
        run(pipe, "wan")
        assert handle.stats()["text_encoder"]["text_encoder"]["prompt_cache_misses"] > 0
