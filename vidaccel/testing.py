"""Tiny random-weight diffusers video pipelines, built from configs entirely offline, for tests and examples.

    pipe = vidaccel.testing.tiny_pipeline("wan")
    video = pipe("a red circle", num_inference_steps=4, **vidaccel.testing.tiny_call_kwargs("wan")).frames

Kinds: "wan", "wan-i2v", "wan2.2", "hunyuan", "cogvideox". Keyword overrides go to the transformer config
(e.g. `num_layers=6`). Every component is seeded, so two calls build identical pipelines.
"""

from __future__ import annotations

from typing import Any

import torch

KINDS = ("wan", "wan-i2v", "wan2.2", "hunyuan", "cogvideox")

_WORDS = (
    "a an the of on in over under with and to from at by red green blue yellow white black orange purple cat dog "
    "circle square triangle ball car person man woman moves walks runs left right up down slowly quickly video "
    "scene background sky water city forest light dark bright small large camera pans zooms"
).split()


def tiny_tokenizer(model_max_length: int = 64):
    """A word-level tokenizer built in code (no files, no hub); unknown words map to <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    vocab = {token: i for i, token in enumerate(specials + list(dict.fromkeys(_WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>",
        model_max_length=model_max_length,
    )


def _seeded(seed: int):
    torch.manual_seed(seed)


def _umt5(vocab_size: int, d_model: int = 32):
    from transformers import UMT5Config, UMT5EncoderModel

    _seeded(1)
    return UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
    )).eval()


def _wan_vae():
    from diffusers import AutoencoderKLWan

    _seeded(2)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def _wan_transformer(seed: int, **overrides):
    from diffusers import WanTransformer3DModel

    config = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    config.update(overrides)
    _seeded(seed)
    return WanTransformer3DModel(**config).eval()


def _wan_scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _wan(**overrides):
    from diffusers import WanPipeline

    tokenizer = tiny_tokenizer()
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=_umt5(len(tokenizer)), vae=_wan_vae(),
        transformer=_wan_transformer(3, **overrides), scheduler=_wan_scheduler(),
    )


def _wan22(**overrides):
    from diffusers import WanPipeline

    tokenizer = tiny_tokenizer()
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=_umt5(len(tokenizer)), vae=_wan_vae(),
        transformer=_wan_transformer(3, **overrides), transformer_2=_wan_transformer(4, **overrides),
        scheduler=_wan_scheduler(), boundary_ratio=0.875,
    )


def _wan_i2v(**overrides):
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    tokenizer = tiny_tokenizer()
    _seeded(5)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=16, patch_size=1,
    )).eval()
    image_processor = CLIPImageProcessor(crop_size=32, size=32)
    overrides = {"in_channels": 36, "image_dim": 4, "added_kv_proj_dim": 64, **overrides}
    return WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=_umt5(len(tokenizer)), vae=_wan_vae(),
        transformer=_wan_transformer(3, **overrides), scheduler=_wan_scheduler(),
        image_processor=image_processor, image_encoder=image_encoder,
    )


def _hunyuan(**overrides):
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer = tiny_tokenizer(model_max_length=256)
    tokenizer_2 = tiny_tokenizer(model_max_length=77)
    config = dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(8, 12, 12),
    )
    config.update(overrides)
    _seeded(3)
    transformer = HunyuanVideoTransformer3DModel(**config).eval()
    _seeded(2)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, act_fn="silu", norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()
    _seeded(1)
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
    )).eval()
    _seeded(4)
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=8, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=8, pad_token_id=0, eos_token_id=1,
        bos_token_id=3,
    )).eval()
    return HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def _cogvideox(**overrides):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_tokenizer()
    config = dict(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=4, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True,
    )
    config.update(overrides)
    _seeded(3)
    transformer = CogVideoXTransformer3DModel(**config).eval()
    _seeded(2)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()
    _seeded(1)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8,
    )).eval()
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())


_BUILDERS = {"wan": _wan, "wan-i2v": _wan_i2v, "wan2.2": _wan22, "hunyuan": _hunyuan, "cogvideox": _cogvideox}


def tiny_pipeline(kind: str, **overrides) -> Any:
    """A tiny random-weight pipeline of `kind` (one of `KINDS`); overrides go to the transformer config."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; choose one of {', '.join(KINDS)}")
    return _BUILDERS[kind](**overrides)


def tiny_call_kwargs(kind: str, *, batch_size: int = 1, cfg: bool = True, steps: int = 4,
                     seed: int = 0) -> dict[str, Any]:
    """Pipeline call arguments that fit the tiny pipeline of `kind` (small video, short text)."""
    prompts = ["a red circle moves left over a blue background", "a green square runs up"][:batch_size]
    if batch_size > 2:
        prompts = prompts * batch_size
        prompts = prompts[:batch_size]
    kwargs: dict[str, Any] = dict(
        prompt=prompts if batch_size > 1 else prompts[0], num_inference_steps=steps, output_type="np",
        generator=torch.Generator().manual_seed(seed),
    )
    if kind in ("wan", "wan2.2", "wan-i2v"):
        kwargs.update(height=32, width=32, num_frames=9, max_sequence_length=16,
                      guidance_scale=5.0 if cfg else 1.0)
        if kind == "wan2.2":
            kwargs["guidance_scale_2"] = 4.0 if cfg else 1.0
        if kind == "wan-i2v":
            from PIL import Image

            kwargs["image"] = Image.new("RGB", (32, 32), (200, 40, 40))
    elif kind == "hunyuan":
        kwargs.update(height=32, width=32, num_frames=9, max_sequence_length=16, guidance_scale=6.0)
        if cfg:
            kwargs.update(true_cfg_scale=4.0, negative_prompt="dark")
    elif kind == "cogvideox":
        kwargs.update(height=32, width=32, num_frames=9, max_sequence_length=16,
                      guidance_scale=6.0 if cfg else 1.0, use_dynamic_cfg=False)
    return kwargs
