"""The shipped reference model: the asset folder, its offline loader and the stock WanPipeline around it."""

import json
import warnings

import pytest
import torch
from diffusers import WanPipeline

from vidaccel.reference import GENERATION_DEFAULTS, MAX_SEQUENCE_LENGTH, reference_asset_dir, reference_pipeline
from vidaccel.reference import data
from vidaccel.reference.architecture import SHIPPED
from vidaccel.reference.pipeline import UnacceptedReferenceWarning
from vidaccel.reference.text_encoder import MiniLMTextEncoder, MiniLMTokenizer, encode_captions


@pytest.fixture(scope="module")
def pipe() -> WanPipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnacceptedReferenceWarning)
        pipe = reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loader_warns_exactly_when_the_weights_have_not_passed_acceptance():
    card = json.loads((reference_asset_dir() / "model_card.json").read_text())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference_pipeline()
    warned = any(issubclass(w.category, UnacceptedReferenceWarning) for w in caught)
    assert warned == (not card["acceptance_passed"])


def test_asset_folder_is_a_small_diffusers_model_folder():
    folder = reference_asset_dir()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["text_encoder"] == ["vidaccel.reference.text_encoder", "MiniLMTextEncoder"]
    weights = sorted(folder.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} == {"vae", "transformer"}
    assert all(p.stat().st_size <= 16 * 2**20 for p in folder.rglob("*"))
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))


def test_loaded_pipeline_is_the_stock_wan_pipeline_with_the_shipped_sizes(pipe):
    assert type(pipe) is WanPipeline
    assert isinstance(pipe.text_encoder, MiniLMTextEncoder) and isinstance(pipe.tokenizer, MiniLMTokenizer)
    config = pipe.transformer.config
    assert config.num_layers == SHIPPED.layers >= 10
    assert config.text_dim == 384
    assert (config.num_attention_heads, config.attention_head_dim) == (SHIPPED.heads, SHIPPED.head_dim)
    assert pipe.scheduler.config.prediction_type == "flow_prediction" and pipe.scheduler.config.use_flow_sigmas
    assert SHIPPED.video_tokens >= 2000
    # Trained latent statistics, not the constructor defaults.
    assert pipe.vae.config.latents_std != [1.0] * SHIPPED.latent_channels
    assert GENERATION_DEFAULTS["max_sequence_length"] == MAX_SEQUENCE_LENGTH


def test_training_embeddings_are_what_the_pipeline_feeds_the_transformer(pipe):
    captions = [scene.caption for scene in data.evaluation_scenes()[:3]]
    positive, negative = pipe.encode_prompt(
        captions, do_classifier_free_guidance=True, max_sequence_length=MAX_SEQUENCE_LENGTH, device=torch.device("cpu")
    )
    assert positive.shape == (3, MAX_SEQUENCE_LENGTH, 384)
    ours = encode_captions(pipe.text_encoder, pipe.tokenizer, captions + [""] * 3, MAX_SEQUENCE_LENGTH)
    assert torch.allclose(ours[:3], positive, atol=1e-5)
    assert torch.allclose(ours[3:], negative, atol=1e-5)


def test_generation_is_deterministic(pipe):
    call = dict(GENERATION_DEFAULTS, height=64, width=64, num_frames=5, num_inference_steps=3, output_type="pt")
    caption = "a red circle moves left over a blue background"
    first = pipe(caption, generator=torch.Generator().manual_seed(7), **call).frames
    second = pipe(caption, generator=torch.Generator().manual_seed(7), **call).frames
    other = pipe(caption, generator=torch.Generator().manual_seed(8), **call).frames
    assert first.shape == (1, 5, 3, 64, 64)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_top_level_helper_is_the_reference_loader():
    import vidaccel

    assert vidaccel.reference_pipeline is reference_pipeline
    assert "reference_pipeline" in vidaccel.__all__
    with pytest.raises(AttributeError, match="no attribute 'reference_pipelines'"):
        vidaccel.reference_pipelines  # noqa: B018
