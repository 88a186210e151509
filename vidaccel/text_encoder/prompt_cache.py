"""Prompt-embedding cache: a text encoder runs once per distinct input.

A diffusers `ModelHook` on the encoder answers a repeated call (same token ids, same attention mask, same
options — so the same text at the same max length) from memory. The negative prompt and repeated prompts are
then encoded once per pipeline. The key needs the token ids on the host: one small transfer per encoder call,
which happens once per generation, not per step.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any

import torch
from diffusers.hooks import ModelHook

PROMPT_CACHE_HOOK = "vidaccel.prompt_cache"


def _fingerprint(value: Any, digest) -> None:
    if torch.is_tensor(value):
        digest.update(f"T{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.detach().to("cpu").contiguous().numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _fingerprint(item, digest)
    elif isinstance(value, dict):
        for key in sorted(value):
            digest.update(str(key).encode())
            _fingerprint(value[key], digest)
    else:
        digest.update(repr(value).encode())


def _clone(value: Any) -> Any:
    """A copy the caller may modify without touching the cache (embeddings are small)."""
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, tuple) and not hasattr(value, "keys"):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if hasattr(value, "keys") and hasattr(value, "__class__"):  # transformers ModelOutput
        return value.__class__(**{k: _clone(v) for k, v in value.items()})
    return value


class PromptCacheHook(ModelHook):
    def __init__(self, max_entries: int = 32):
        super().__init__()
        self.max_entries = max_entries
        self.entries: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        digest = hashlib.sha256()
        _fingerprint((args, kwargs), digest)
        key = digest.hexdigest()
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return _clone(self.entries[key])
        self.misses += 1
        output = self.fn_ref.original_forward(*args, **kwargs)
        self.entries[key] = _clone(output)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return output

    def clear(self) -> None:
        self.entries.clear()
