"""Fidelity of a quantized text encoder: per-token agreement of the embeddings the pipeline feeds the DiT.

An *encode function* maps a batch of prompts to ``(embeddings, mask)``: embeddings ``(batch, tokens, dim)`` and a
boolean mask of the real (non-padding) tokens. Only real tokens are compared, since padding positions are either
zeroed or ignored by the pipelines. For each real token we take the cosine similarity and the relative L2 error
``|e_q - e_ref| / |e_ref|`` against the reference encoder, then summarise over all tokens of all prompts. The
noise floor is the same comparison for a plain bf16 copy of the reference (fp32) encoder: a quantized encoder
whose numbers sit at the floor is as good as the precision the pipeline already runs in.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

EncodeFn = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]
EmbeddingBatches = list[tuple[torch.Tensor, torch.Tensor]]

DEFAULT_PROMPTS_PATH = Path(__file__).with_name("prompts.json")


def load_default_prompts() -> list[str]:
    """The shipped prompt set (video-generation style; the longest reach a 512-token encoder's limit)."""
    data = json.loads(DEFAULT_PROMPTS_PATH.read_text(encoding="utf-8"))
    return list(data["prompts"])


@dataclasses.dataclass(frozen=True)
class TokenFidelity:
    """Summary over all real tokens: cosine (mean, 1st percentile, min) and relative L2 (mean, max)."""

    tokens: int
    cosine_mean: float
    cosine_p1: float
    cosine_min: float
    rel_l2_mean: float
    rel_l2_max: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FidelityReport:
    candidate: TokenFidelity
    noise_floor: TokenFidelity | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.to_dict(),
            "noise_floor": None if self.noise_floor is None else self.noise_floor.to_dict(),
        }


def per_token_errors(
    reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity and relative L2 error of each real token, as float64 vectors."""
    if reference.shape != candidate.shape:
        raise ValueError(f"embedding shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    if mask.shape != reference.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match embeddings {tuple(reference.shape)}")
    keep = mask.to(device=reference.device, dtype=torch.bool)
    ref = reference[keep].to(torch.float64)
    cand = candidate.to(reference.device)[keep].to(torch.float64)
    ref_norm = ref.norm(dim=-1)
    cand_norm = cand.norm(dim=-1)
    tiny = torch.finfo(torch.float64).tiny
    cosine = (ref * cand).sum(dim=-1) / (ref_norm * cand_norm).clamp_min(tiny)
    # Two all-zero tokens agree perfectly; one zero against a nonzero one is as wrong as it gets.
    both_zero = (ref_norm == 0) & (cand_norm == 0)
    cosine = torch.where(both_zero, torch.ones_like(cosine), cosine)
    diff = (ref - cand).norm(dim=-1)
    rel_l2 = torch.where(
        ref_norm > 0, diff / ref_norm.clamp_min(tiny), torch.where(diff > 0, torch.inf, 0.0)
    )
    return cosine, rel_l2


def summarize(cosine: torch.Tensor, rel_l2: torch.Tensor) -> TokenFidelity:
    if cosine.numel() == 0:
        raise ValueError("no real tokens to compare (all masks are empty)")
    return TokenFidelity(
        tokens=int(cosine.numel()),
        cosine_mean=float(cosine.mean()),
        cosine_p1=float(torch.quantile(cosine, 0.01)),
        cosine_min=float(cosine.min()),
        rel_l2_mean=float(rel_l2.mean()),
        rel_l2_max=float(rel_l2.max()),
    )


def token_fidelity(reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor) -> TokenFidelity:
    """Fidelity of one batch of embeddings."""
    return summarize(*per_token_errors(reference, candidate, mask))


@torch.no_grad()
def encode_all(encode: EncodeFn, prompts: Sequence[str], batch_size: int = 8) -> EmbeddingBatches:
    """Run ``encode`` over ``prompts`` in batches; embeddings and masks come back on the CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches: EmbeddingBatches = []
    for start in range(0, len(prompts), batch_size):
        embeddings, mask = encode(list(prompts[start : start + batch_size]))
        batches.append((embeddings.detach().cpu(), mask.detach().cpu().to(torch.bool)))
    return batches


def compare_embeddings(reference: EmbeddingBatches, candidate: EmbeddingBatches) -> TokenFidelity:
    """Fidelity over all real tokens of batches made by :func:`encode_all` from the same prompts."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference batches but {len(candidate)} candidate batches")
    cosines, errors = [], []
    for (ref, ref_mask), (cand, cand_mask) in zip(reference, candidate):
        if not torch.equal(ref_mask, cand_mask):
            raise ValueError("reference and candidate disagree on which tokens are real (different tokenization?)")
        cosine, rel_l2 = per_token_errors(ref, cand, ref_mask)
        cosines.append(cosine)
        errors.append(rel_l2)
    return summarize(torch.cat(cosines), torch.cat(errors))


def measure_fidelity(
    reference: EncodeFn,
    candidate: EncodeFn,
    prompts: Sequence[str] | None = None,
    noise_floor: EncodeFn | None = None,
    batch_size: int = 8,
) -> FidelityReport:
    """Compare ``candidate`` (and optionally a bf16 ``noise_floor`` encoder) with ``reference`` on ``prompts``."""
    prompts = load_default_prompts() if prompts is None else list(prompts)
    ref = encode_all(reference, prompts, batch_size)
    floor = None if noise_floor is None else compare_embeddings(ref, encode_all(noise_floor, prompts, batch_size))
    return FidelityReport(compare_embeddings(ref, encode_all(candidate, prompts, batch_size)), floor)


def hf_encode_fn(model: torch.nn.Module, tokenizer: Any, max_length: int | None = None) -> EncodeFn:
    """Encode function for a transformers encoder: ``last_hidden_state`` and the attention mask.

    Prompts are padded to the longest in the batch and truncated at ``max_length`` (default: the tokenizer's
    ``model_max_length``). Inputs go to the device of the model's first parameter.
    """

    def encode(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(model.parameters()).device
        tokens = tokenizer(
            list(prompts),
            padding="longest",
            truncation=True,
            max_length=max_length or tokenizer.model_max_length,
            return_tensors="pt",
        )
        tokens = {k: v.to(device) for k, v in tokens.items()}
        output = model(**tokens)
        return output.last_hidden_state, tokens["attention_mask"].to(torch.bool)

    return encode
