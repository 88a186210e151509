"""Load a pipeline and run timed, seeded generations: shared by `vidaccel generate`, `vidaccel bench` and the
demo."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from typing import Any, Optional

import numpy as np
import torch

# Full-size Wan 2.1 transformer architectures (random weights) for speed-only runs on a GPU.
WAN_ARCHS: dict[str, dict[str, Any]] = {
    "wan-1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                     text_dim=4096, freq_dim=256, in_channels=16, out_channels=16, patch_size=(1, 2, 2),
                     cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "wan-14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
                    text_dim=4096, freq_dim=256, in_channels=16, out_channels=16, patch_size=(1, 2, 2),
                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
}


# Denoising steps for the reference model on a CPU (50-step runs are for GPU benchmarks).
CPU_REFERENCE_STEPS = 20


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


@dataclasses.dataclass
class LoadedPipeline:
    """A pipeline plus the call arguments that suit it (size, frames, steps...)."""

    pipe: Any
    name: str
    call_defaults: dict[str, Any]
    # random-weight architectures take prompt embeddings instead of prompts
    prompt_embeds: Optional[tuple[torch.Tensor, torch.Tensor]] = None


def load_pipeline(model: Optional[str] = None, *, tiny: Optional[str] = None, arch: Optional[str] = None,
                  device: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> LoadedPipeline:
    """The reference model (default), a local diffusers folder (`model`), a tiny test pipeline (`tiny`) or a
    full-size random-weight architecture (`arch`, GPU speed runs)."""
    device = device or best_device()
    dtype = dtype or default_dtype(device)
    if tiny is not None:
        from .testing import tiny_call_kwargs, tiny_pipeline

        defaults = tiny_call_kwargs(tiny)
        for key in ("prompt", "generator", "output_type"):
            defaults.pop(key, None)
        return LoadedPipeline(tiny_pipeline(tiny).to(device), f"tiny-{tiny}", defaults)
    if arch is not None:
        return _load_arch(arch, device, dtype)
    if model is None:
        from .reference import GENERATION_DEFAULTS, reference_pipeline

        defaults = dict(GENERATION_DEFAULTS)
        if device == "cpu":  # same video size (token count), fewer steps: DESIGN.md §4's CPU budget
            defaults["num_inference_steps"] = CPU_REFERENCE_STEPS
        return LoadedPipeline(reference_pipeline(device=device, dtype=dtype), "reference", defaults)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True).to(device)
    return LoadedPipeline(pipe, model, {})


def _load_arch(arch: str, device: str, dtype: torch.dtype) -> LoadedPipeline:
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    if arch not in WAN_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(WAN_ARCHS)}")
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)  # initialise directly in the target dtype: 14B fp32 would not fit
        with torch.device(device):
            transformer = WanTransformer3DModel(**WAN_ARCHS[arch]).eval()
    finally:
        torch.set_default_dtype(previous)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    generator = torch.Generator(device).manual_seed(1)
    text = WAN_ARCHS[arch]["text_dim"]
    embeds = tuple(torch.randn(1, 512, text, device=device, dtype=dtype, generator=generator) for _ in range(2))
    defaults = dict(height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=5.0,
                    output_type="latent")
    return LoadedPipeline(pipe, arch, defaults, prompt_embeds=embeds)


@dataclasses.dataclass
class Generation:
    video: Any  # np.ndarray (frames, H, W, 3) in [0, 1], or the latent tensor for output_type="latent"
    seconds: float
    peak_memory_bytes: Optional[int]


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generate(loaded: LoadedPipeline, prompt: str, *, seed: int = 0, progress: bool = True,
             **overrides: Any) -> Generation:
    """One timed generation (wall clock, device synchronised) with a seeded generator."""
    pipe = loaded.pipe
    device = str(pipe._execution_device)
    kwargs = {**loaded.call_defaults, **overrides}
    kwargs.setdefault("output_type", "np")
    if loaded.prompt_embeds is not None:
        kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"] = loaded.prompt_embeds
    else:
        kwargs["prompt"] = prompt
    kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    pipe.set_progress_bar_config(disable=not progress)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = pipe(**kwargs)
    _synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    video = output.frames
    if kwargs["output_type"] == "np":
        video = np.asarray(video)[0]
    return Generation(video, seconds, peak)


def warm_up(loaded: LoadedPipeline, prompt: str, *, seed: int = 0, steps: int = 2, **overrides: Any) -> None:
    """An untimed short generation, so that one-time set-up (kernel compilation, autotuning, masks) is not timed.

    LeMiCa's warning that a plan was rescaled to this run's few steps is silenced here: it describes the warm-up,
    not the timed run, which warns on its own if its step count needs a rescale.
    """
    from .offline_planner.plan_file import PlanWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlanWarning)
        generate(loaded, prompt, seed=seed, progress=False, **{**overrides, "num_inference_steps": steps})


@contextlib.contextmanager
def accelerated(pipe: Any, preset: Any):
    """`vidaccel.apply` for the duration of a block; yields the handle."""
    from .api import apply

    handle = apply(pipe, preset)
    try:
        yield handle
    finally:
        handle.remove()
