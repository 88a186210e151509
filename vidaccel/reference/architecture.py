"""Sizes of the reference model and the constructors for its stock diffusers components.

Chosen from CPU timings on the 2-core development machine (see benchmarks/reference_training/README.md): at the
default 33x256x256 size the transformer sees 9x16x16 = 2,304 video tokens, and self-attention over them dominates a
CPU call, growing with heads x head_dim. Two heads of 32 keep a 50-step CFG generation well under a minute on that
CPU; ten layers give block caching a probe, a middle and a corrector.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

from .text_encoder import HIDDEN_SIZE

# Captions are at most ~20 word pieces; the transformer was trained with prompt embeddings zero-padded to this
# length, and cross-attention has no mask, so every pipeline call must pass the same value.
MAX_SEQUENCE_LENGTH = 64
# Wan's flow-matching convention: x_t = (1 - sigma) * x0 + sigma * noise, the model predicts noise - x0, the
# transformer's timestep is sigma * 1000, and sigmas follow shift * s / (1 + (shift - 1) * s).
FLOW_SHIFT = 3.0
NUM_TRAIN_TIMESTEPS = 1000

# Keyword arguments a WanPipeline call needs for the reference model's default generation.
GENERATION_DEFAULTS: dict[str, Any] = {
    "height": 256,
    "width": 256,
    "num_frames": 33,
    "num_inference_steps": 50,
    "guidance_scale": 5.0,
    "max_sequence_length": MAX_SEQUENCE_LENGTH,
}


@dataclasses.dataclass(frozen=True)
class ReferenceSizes:
    """Every size that differs between the shipped model and the tiny smoke configuration used in CI."""

    vae_base_dim: int = 16
    vae_num_res_blocks: int = 1
    # 1: Wan 2.1's plain layout (three 2x downsamples). 2: fold 2x2 pixel patches into channels first, as Wan 2.2's
    # VAE does, and downsample twice, so the widest layers run at half resolution (not yet trained at full size).
    vae_patch_size: int = 1
    latent_channels: int = 16
    heads: int = 2
    head_dim: int = 32
    ffn_dim: int = 512
    layers: int = 10
    freq_dim: int = 256
    num_frames: int = 33
    height: int = 256
    width: int = 256
    max_sequence_length: int = MAX_SEQUENCE_LENGTH

    def __post_init__(self) -> None:
        if (self.num_frames - 1) % 4:
            raise ValueError("num_frames must be 4k + 1 (the Wan VAE compresses time by 4 after the first frame)")
        if self.height % 16 or self.width % 16:
            raise ValueError("height and width must be multiples of 16 (VAE factor 8 x patch 2)")

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.latent_channels, (self.num_frames - 1) // 4 + 1, self.height // 8, self.width // 8)

    @property
    def video_tokens(self) -> int:
        _, frames, height, width = self.latent_shape
        return frames * (height // 2) * (width // 2)


SHIPPED = ReferenceSizes()
# The shipped widths at 9x64x64 (48 video tokens): cheap enough to check the training recipe on a CPU.
MINI = ReferenceSizes(num_frames=9, height=64, width=64)
SMOKE = ReferenceSizes(
    vae_base_dim=4,
    vae_patch_size=2,
    latent_channels=4,
    heads=2,
    head_dim=8,
    ffn_dim=32,
    layers=2,
    freq_dim=32,
    num_frames=5,
    height=32,
    width=32,
    max_sequence_length=16,
)


def build_vae(
    sizes: ReferenceSizes = SHIPPED, latents_mean: list[float] | None = None, latents_std: list[float] | None = None
) -> AutoencoderKLWan:
    """A fresh Wan VAE (8x spatial, 4x temporal compression). Latent statistics default to mean 0, std 1."""
    channels, patch = sizes.latent_channels, sizes.vae_patch_size
    # Spatial compression = patch x 2^(number of downsamples) = 8; every downsample also halves time (4x).
    downsamples = {1: 3, 2: 2, 4: 1}[patch]
    return AutoencoderKLWan(
        base_dim=sizes.vae_base_dim,
        z_dim=channels,
        dim_mult=[1, 2, 4, 4][: downsamples + 1],
        num_res_blocks=sizes.vae_num_res_blocks,
        attn_scales=[],
        temperal_downsample=[False, True, True][-downsamples:],
        in_channels=3 * patch * patch,
        out_channels=3 * patch * patch,
        patch_size=patch if patch > 1 else None,
        scale_factor_spatial=8,
        scale_factor_temporal=4,
        latents_mean=list(latents_mean) if latents_mean is not None else [0.0] * channels,
        latents_std=list(latents_std) if latents_std is not None else [1.0] * channels,
    )


def build_transformer(sizes: ReferenceSizes = SHIPPED) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=sizes.heads,
        attention_head_dim=sizes.head_dim,
        in_channels=sizes.latent_channels,
        out_channels=sizes.latent_channels,
        text_dim=HIDDEN_SIZE,
        freq_dim=sizes.freq_dim,
        ffn_dim=sizes.ffn_dim,
        num_layers=sizes.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )


def build_scheduler() -> UniPCMultistepScheduler:
    """The scheduler Wan 2.1 ships (UniPC, flow prediction, flow sigmas) with our flow shift."""
    return UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=FLOW_SHIFT,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
