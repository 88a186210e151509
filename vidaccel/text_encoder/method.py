"""`TextEncoderQuant` as a vidaccel method: quantize the pipeline's text encoder(s) and cache prompt embeddings;
`uninstall` puts the original layers back bit for bit and drops the cache."""

from __future__ import annotations

from typing import Any

from ..hooks import HookAttachment
from ..method import AccelMethod
from .prompt_cache import PROMPT_CACHE_HOOK, PromptCacheHook
from .quantize import QuantizationResult, TextEncoderQuant, quantize_text_encoder


def tokenizer_attribute(encoder_attribute: str) -> str:
    """The pipeline attribute of an encoder's tokenizer: diffusers pairs ``text_encoder[_N]`` with
    ``tokenizer[_N]``."""
    return "tokenizer" + encoder_attribute.removeprefix("text_encoder")


class TextEncoderQuantMethod(AccelMethod):
    def __init__(self, config: TextEncoderQuant):
        self.config = config
        self.results: dict[str, QuantizationResult] = {}
        self.caches: dict[str, PromptCacheHook] = {}
        self._attachments: list[HookAttachment] = []

    def install(self, adapter) -> None:
        encoders = adapter.text_encoders()
        tokenizers: dict[str, Any] = {}
        if self.config.calibration is not None:  # check every encoder before touching any
            for name in encoders:
                tokenizers[name] = getattr(adapter.pipe, tokenizer_attribute(name), None)
                if tokenizers[name] is None:
                    raise ValueError(
                        f"calibration={self.config.calibration!r} needs the tokenizer of {name!r}, but the pipeline "
                        f"has no {tokenizer_attribute(name)!r}; use calibration=None (data-free) for this pipeline"
                    )
        for name, encoder in encoders.items():
            self.results[name] = quantize_text_encoder(encoder, self.config, tokenizer=tokenizers.get(name))
            if self.config.prompt_cache:
                hook = PromptCacheHook()
                self._attachments.append(HookAttachment(encoder, hook, PROMPT_CACHE_HOOK))
                self.caches[name] = hook

    def uninstall(self) -> None:
        while self._attachments:
            self._attachments.pop().detach()
        for cache in self.caches.values():
            cache.clear()  # invalidated: embeddings of the quantized encoder must not outlive it
        errors = []
        for result in reversed(list(self.results.values())):
            try:
                result.restore()
            except RuntimeError as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, result in self.results.items():
            out[name] = {"format": self.config.method, "quantized_linear_layers": len(result.quantized_modules),
                         "quantized_embeddings": len(result.quantized_embeddings),
                         "skipped_linear_layers": len(result.skipped), "bytes_before": result.bytes_before,
                         "bytes_after": result.bytes_after}
            if result.calibration is not None:
                out[name]["calibration"] = result.calibration
        for name, cache in self.caches.items():
            out.setdefault(name, {}).update(prompt_cache_hits=cache.hits, prompt_cache_misses=cache.misses)
        return out
