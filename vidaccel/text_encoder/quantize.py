"""Quantize a text encoder in place and put it back exactly.

``quantize_text_encoder(encoder, TextEncoderQuant(method="int8"))`` swaps every eligible ``nn.Linear`` for a
:class:`QuantizedLinear` and returns a :class:`QuantizationResult` whose ``restore()`` puts the very same
``nn.Linear`` objects back, bit for bit. Norms and T5's relative-position biases are not linear layers and stay
as they are; ``skip_modules`` patterns keep chosen linear layers in full precision too. Token embeddings stay as
they are unless ``quantize_embeddings`` is on: then every eligible ``nn.Embedding`` becomes a
:class:`QuantizedEmbedding` (int8 or int4 rows), restored the same way.

By default quantization is data-free. ``calibration="gptq"`` instead runs calibration prompts through the
encoder (its tokenizer is needed: ``quantize_text_encoder(encoder, config, tokenizer=...)``) and lets GPTQ choose
the rounding of every linear layer, sequentially (see :mod:`.gptq`); the packed storage is the same.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, ClassVar

import torch
from torch import nn

from ..method import MethodConfig
from .formats import INT4_GROUP_SIZES
from .hadamard import is_power_of_two
from .quantized_embedding import QuantizedEmbedding, conversion_error
from .quantized_linear import METHODS, QuantizedLinear, required_multiple
from .gptq import (
    CALIBRATION_METHODS,
    CalibrationStats,
    calibrate_sequentially,
    load_calibration_prompts,
    quantize_linear_gptq,
    tokenize_calibration,
)
from .sinq import SINQ_ITERATIONS

# fnmatch patterns on the dotted module name, case-sensitive.
DEFAULT_SKIP_MODULES: tuple[str, ...] = (
    "*embed*",
    "*shared*",  # T5's token embedding
    "*norm*",
    "*LayerNorm*",
    "*relative_attention_bias*",
    "lm_head",
    "*.lm_head",
)
# The default patterns that keep token embeddings out of the linear pass. With ``quantize_embeddings`` on, the
# embeddings are asked for explicitly, so these two do not apply to ``nn.Embedding`` modules (other patterns do).
LINEAR_ONLY_PATTERNS: tuple[str, ...] = ("*embed*", "*shared*")
# T5/UMT5 feed-forward output projection (transformers keeps it in fp32 for fp16 runs).
T5_WO_PATTERN = "*DenseReluDense.wo"
HADAMARD_BLOCK_RANGE = (2, 4096)


@dataclasses.dataclass(frozen=True)
class TextEncoderQuant(MethodConfig):
    """Low-precision weights for the pipeline's text encoder.

    method: one of int8, fp8 (per-row), int4 (asymmetric RTN per group), int4-sinq / int8-sinq (SINQ-scaled
        int4 / int8: a Sinkhorn-balanced column scale per input feature, folded into the activation),
        nvfp4, mxfp4, nvint4 (microscaling 4-bit; their block sizes are fixed by the format).
    group_size: int4 / int4-sinq group along the input dimension (32, 64 or 128).
    hadamard: rotate each layer's input dimension by a block Hadamard matrix before quantizing.
    hadamard_block: the rotation's block size (a power of two).
    skip_modules: fnmatch patterns of module names to keep in full precision.
    quantize_t5_wo: quantize T5/UMT5 ``DenseReluDense.wo`` too (False adds it to the skipped patterns).
    keep_originals_on_cpu: keep the original layers (on CPU) so that ``restore()`` can put them back; False
        drops them, which is the only way to save host memory when the encoder itself lives on the CPU.
    sinq_iterations: Sinkhorn rounds for int4-sinq / int8-sinq.
    quantize_embeddings: also store every ``nn.Embedding`` table in low precision (``embedding_method``: int8
        rows for int8/fp8, int4 rows in groups of ``group_size`` for the 4-bit methods). Needed to bring big
        encoders down to their memory targets: UMT5-XXL's token table alone is 2.1 GB of its 11.4 GB in bf16.
        ``skip_modules`` patterns apply to embeddings too, except the defaults ``*embed*`` and ``*shared*``.
    fp8_scaled_mm: let fp8 layers use ``torch._scaled_mm`` (activations quantized per token) where supported.
    calibration: None (data-free, the default) or "gptq": GPTQ rounding against the Hessians of the layers'
        inputs on calibration prompts, layer after layer (module :mod:`.gptq`); needs the encoder's tokenizer.
        Same formats, same stored bits; embedding tables stay data-free.
    calibration_prompts: the prompts for calibration (None: the shipped ``calibration_prompts.json``, which is
        disjoint from the evaluation prompts).
    gptq_damp: GPTQ's damping, as a fraction of the mean diagonal of the Hessian.
    gptq_act_order: GPTQ visits the input columns by decreasing activation energy (diag of the Hessian) instead
        of left to right.
    """

    role: ClassVar[str] = "text_encoder"
    name: ClassVar[str] = "text_encoder_quant"

    method: str = "int8"
    group_size: int = 64
    hadamard: bool = False
    hadamard_block: int = 64
    skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES
    quantize_t5_wo: bool = True
    keep_originals_on_cpu: bool = True
    sinq_iterations: int = SINQ_ITERATIONS
    fp8_scaled_mm: bool = True
    prompt_cache: bool = True  # as a vidaccel method: encode each distinct prompt once per pipeline
    quantize_embeddings: bool = False
    calibration: str | None = None
    calibration_prompts: tuple[str, ...] | None = None
    gptq_damp: float = 0.01
    gptq_act_order: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown text-encoder method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size!r}")
        lo, hi = HADAMARD_BLOCK_RANGE
        if not (
            isinstance(self.hadamard_block, int) and lo <= self.hadamard_block <= hi
            and is_power_of_two(self.hadamard_block)
        ):
            raise ValueError(f"hadamard_block must be a power of two in [{lo}, {hi}], got {self.hadamard_block!r}")
        if isinstance(self.skip_modules, str):
            raise TypeError("skip_modules must be a sequence of patterns, not one string")
        patterns = tuple(self.skip_modules)
        if not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"skip_modules must hold non-empty strings, got {patterns!r}")
        object.__setattr__(self, "skip_modules", patterns)
        for flag in (
            "hadamard", "quantize_t5_wo", "keep_originals_on_cpu", "fp8_scaled_mm", "prompt_cache",
            "quantize_embeddings", "gptq_act_order",
        ):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if not (isinstance(self.sinq_iterations, int) and 0 <= self.sinq_iterations <= 256):
            raise ValueError(f"sinq_iterations must be an int in [0, 256], got {self.sinq_iterations!r}")
        self._check_calibration()

    def _check_calibration(self) -> None:
        if self.calibration is not None and self.calibration not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration {self.calibration!r}; choose None (data-free) or one of "
                             f"{', '.join(map(repr, CALIBRATION_METHODS))}")
        prompts = self.calibration_prompts
        if prompts is not None:
            if isinstance(prompts, str):
                raise TypeError("calibration_prompts must be a sequence of prompts, not one string")
            prompts = tuple(prompts)
            if not prompts:
                raise ValueError("calibration_prompts is empty; give at least one prompt, or None for the shipped "
                                 "calibration set")
            if not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ValueError("calibration_prompts must hold non-empty strings")
            if self.calibration is None:
                raise ValueError("calibration_prompts were given but calibration is None (data-free); "
                                 "set calibration='gptq' to use them")
            object.__setattr__(self, "calibration_prompts", prompts)
        damp = self.gptq_damp
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (0.0 < damp <= 1.0):
            raise ValueError(f"gptq_damp must be a number in (0, 1], got {damp!r}")
        object.__setattr__(self, "gptq_damp", float(damp))

    def to_dict(self) -> dict[str, Any]:
        # the base puts the method config's name under "method", which is also this config's format field
        return {**super().to_dict(), "format": self.method}

    def build(self):
        from .method import TextEncoderQuantMethod

        return TextEncoderQuantMethod(self)

    @property
    def skip_patterns(self) -> tuple[str, ...]:
        """``skip_modules`` plus T5's ``wo`` when ``quantize_t5_wo`` is off."""
        return self.skip_modules if self.quantize_t5_wo else (*self.skip_modules, T5_WO_PATTERN)

    def skip_reason(self, module_name: str) -> str | None:
        for pattern in self.skip_patterns:
            if fnmatch.fnmatchcase(module_name, pattern):
                return f"name matches skip pattern {pattern!r}"
        return None

    @property
    def embedding_method(self) -> str:
        """The embedding table format that goes with ``method``: int8 for the 8-bit methods, else int4."""
        return "int8" if self.method in ("int8", "int8-sinq", "fp8") else "int4"

    def embedding_skip_reason(self, module_name: str) -> str | None:
        for pattern in self.skip_patterns:
            if pattern not in LINEAR_ONLY_PATTERNS and fnmatch.fnmatchcase(module_name, pattern):
                return f"name matches skip pattern {pattern!r}"
        return None


def module_bytes(module: nn.Module) -> int:
    """Bytes of all distinct parameters and buffers of ``module``."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


@dataclasses.dataclass
class _Swap:
    parent: nn.Module
    child_name: str
    quantized: QuantizedLinear | QuantizedEmbedding
    original: nn.Linear | nn.Embedding | None  # None once dropped (keep_originals_on_cpu=False)


class QuantizationResult:
    """What :func:`quantize_text_encoder` did, and the way back.

    ``quantized_modules`` / ``skipped`` list the linear layers, ``quantized_embeddings`` / ``skipped_embeddings``
    the embedding tables (both empty unless ``quantize_embeddings`` is on).
    """

    def __init__(
        self,
        config: TextEncoderQuant,
        swaps: list[_Swap],
        quantized_modules: list[str],
        skipped: dict[str, str],
        bytes_before: int,
        bytes_after: int,
        quantized_embeddings: list[str] | None = None,
        skipped_embeddings: dict[str, str] | None = None,
        calibration: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self._swaps = swaps
        self.quantized_modules = quantized_modules
        self.skipped = skipped
        self.quantized_embeddings = quantized_embeddings or []
        self.skipped_embeddings = skipped_embeddings or {}
        self.bytes_before = bytes_before
        self.bytes_after = bytes_after
        # GPTQ runs only: prompts, real tokens, stages, forward passes, layers the prompts never reached.
        self.calibration = calibration
        self.restored = False

    @property
    def can_restore(self) -> bool:
        return self.config.keep_originals_on_cpu

    def restore(self) -> None:
        """Put the original ``nn.Linear`` (and ``nn.Embedding``) objects back, bit-exact, on the device the
        encoder is on now.

        Safe to call twice. Raises if the originals were dropped or a swapped slot was changed by someone else.
        """
        if self.restored:
            return
        if not self.can_restore:
            raise RuntimeError(
                "cannot restore the text encoder: it was quantized with keep_originals_on_cpu=False, so the "
                "original layers were dropped; reload the encoder from its checkpoint instead"
            )
        for swap in self._swaps:
            current = swap.parent._modules.get(swap.child_name)
            if current is not swap.quantized:
                raise RuntimeError(
                    f"cannot restore {swap.child_name!r} of {type(swap.parent).__name__}: the slot no longer holds "
                    f"the {type(swap.quantized).__name__} installed there (found {type(current).__name__})"
                )
        for swap in self._swaps:
            assert swap.original is not None
            swap.original.to(device=swap.quantized.qweight.device)
            swap.parent._modules[swap.child_name] = swap.original
        # Let the packed weights go: a kept result must not hold device memory after the way back.
        self._swaps = []
        self.restored = True

    def summary(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "quantized_modules": len(self.quantized_modules),
            "skipped": dict(self.skipped),
            "quantized_embeddings": len(self.quantized_embeddings),
            "skipped_embeddings": dict(self.skipped_embeddings),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            **({"calibration": self.calibration} if self.calibration is not None else {}),
        }

    def __repr__(self) -> str:
        return (
            f"QuantizationResult(method={self.config.method!r}, quantized={len(self.quantized_modules)}, "
            f"skipped={len(self.skipped)}, bytes {self.bytes_before} -> {self.bytes_after})"
        )


def _ineligible_reason(parent: nn.Module, child: nn.Linear) -> str | None:
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its projection weights directly"
    if type(child) is not nn.Linear:
        return f"{type(child).__name__} is a subclass of nn.Linear whose forward may differ"
    if child.weight.device.type == "meta":
        return "weight is on the meta device (not loaded)"
    if hasattr(child, "_hf_hook"):
        return "has an accelerate hook (offloaded); quantize before enabling offload"
    return None


@torch.no_grad()
def quantize_text_encoder(
    module: nn.Module, config: TextEncoderQuant, tokenizer: Any = None, max_length: int | None = None
) -> QuantizationResult:
    """Swap ``module``'s eligible ``nn.Linear`` children for :class:`QuantizedLinear`, in place.

    A linear layer is skipped (and the reason recorded in ``result.skipped``) when its name matches a skip
    pattern, when its input size does not fit the format's block or group size (or the Hadamard block), or when
    it is not a plain ``nn.Linear`` that can be swapped safely. A layer shared under several names is quantized
    once and swapped everywhere. With ``config.quantize_embeddings``, ``nn.Embedding`` children become
    :class:`QuantizedEmbedding` by the same rules (see :func:`_swap_embeddings`).

    ``tokenizer`` (and ``max_length``, default ``min(tokenizer.model_max_length, 512)``) is only used, and then
    required, with ``config.calibration="gptq"``: the calibration prompts are tokenized with it and run through
    ``module(input_ids=..., attention_mask=...)`` on the encoder's own device.
    """
    if not isinstance(config, TextEncoderQuant):
        raise TypeError(f"config must be a TextEncoderQuant, got {type(config).__name__}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
    calibration_batches = None
    if config.calibration is not None:
        if tokenizer is None:
            raise ValueError(
                f"calibration={config.calibration!r} runs prompts through the encoder and needs its tokenizer: "
                "pass tokenizer=... (a pipeline supplies its own), or use calibration=None for data-free quantization"
            )
        prompts = list(config.calibration_prompts or load_calibration_prompts())
        device = next(module.parameters()).device
        calibration_batches = tokenize_calibration(tokenizer, prompts, device, max_length)
    bytes_before = module_bytes(module)
    hadamard_block = config.hadamard_block if config.hadamard else None
    built: dict[int, QuantizedLinear] = {}
    failed: dict[int, str] = {}
    swaps: list[_Swap] = []
    quantized_modules: list[str] = []
    skipped: dict[str, str] = {}

    slots = [
        (parent_name, parent, child_name, child)
        for parent_name, parent in module.named_modules(remove_duplicate=False)
        for child_name, child in list(parent._modules.items())
        if isinstance(child, nn.Linear)
    ]
    slot_count: dict[int, int] = {}
    for *_, child in slots:
        slot_count[id(child)] = slot_count.get(id(child), 0) + 1
    # (full name, parent, child name, child, reason to skip or None), and the distinct eligible layers in order.
    plan = []
    targets: dict[int, nn.Linear] = {}
    eligible_slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent_name, parent, child_name, child in slots:
        full_name = f"{parent_name}.{child_name}" if parent_name else child_name
        reason = config.skip_reason(full_name) or _ineligible_reason(parent, child)
        plan.append((full_name, parent, child_name, child, reason))
        if reason is None:
            targets.setdefault(id(child), child)
            eligible_slots.setdefault(id(child), []).append((parent, child_name))

    def quantize_layer(child: nn.Linear, hessian: torch.Tensor | None = None) -> None:
        """Build the layer's QuantizedLinear (GPTQ with a Hessian, else data-free) and install it in every
        eligible slot right away (calibration needs the later layers to see the quantized ones)."""
        common = dict(group_size=config.group_size, hadamard_block=hadamard_block,
                      sinq_iterations=config.sinq_iterations, allow_scaled_mm=config.fp8_scaled_mm)
        try:
            if hessian is None:
                quantized = QuantizedLinear.from_linear(child, config.method, **common)
            else:
                quantized = quantize_linear_gptq(child, config.method, hessian, damp=config.gptq_damp,
                                                 act_order=config.gptq_act_order, **common)
        except ValueError as error:
            failed[id(child)] = str(error)
            return
        built[id(child)] = quantized
        devices[id(child)] = child.weight.device
        for parent, child_name in eligible_slots[id(child)]:
            parent._modules[child_name] = quantized
        if config.keep_originals_on_cpu and slot_count[id(child)] == 1:
            child.to("cpu")  # right away: one layer at a time keeps the accelerator's peak low

    devices: dict[int, torch.device] = {}
    stats: CalibrationStats | None = None
    if calibration_batches is None:
        for child in targets.values():
            quantize_layer(child)
    else:
        need = required_multiple(config.method, config.group_size, hadamard_block)
        unfit = [child for child in targets.values() if child.weight.shape[1] % need]
        for child in unfit:
            quantize_layer(child)  # records the same reason as the data-free path
        layers = [child for child in targets.values() if id(child) not in failed]
        try:
            stats = calibrate_sequentially(module, layers, calibration_batches, quantize_layer)
        except BaseException:
            # Put back what was swapped so far, whatever keep_originals_on_cpu says: the originals are still
            # referenced here, and a half-quantized encoder must never be left behind.
            for key, child in targets.items():
                if key in built:
                    child.to(devices[key])
                    for parent, child_name in eligible_slots[key]:
                        parent._modules[child_name] = child
            raise

    shared: dict[int, nn.Linear] = {}
    for full_name, parent, child_name, child, reason in plan:
        if reason is None and id(child) in failed:
            reason = failed[id(child)]
        if reason is not None:
            skipped[full_name] = reason
            continue
        swaps.append(
            _Swap(parent, child_name, built[id(child)], child if config.keep_originals_on_cpu else None)
        )
        quantized_modules.append(full_name)
        if config.keep_originals_on_cpu and slot_count[id(child)] > 1:
            shared[id(child)] = child
    # A layer shared under several names moves only if no slot (e.g. a skipped one) still uses it in place.
    still_used = {id(m) for m in module.modules()}
    for key, child in shared.items():
        if key not in still_used:
            child.to("cpu")
    quantized_embeddings: list[str] = []
    skipped_embeddings: dict[str, str] = {}
    if config.quantize_embeddings:
        quantized_embeddings, skipped_embeddings = _swap_embeddings(module, config, swaps)
    calibration = None
    if stats is not None:
        names: dict[int, str] = {}
        for full_name, _, _, child, _ in plan:
            names.setdefault(id(child), full_name)
        calibration = {"method": config.calibration, **stats.to_dict(names)}
    return QuantizationResult(
        config, swaps, quantized_modules, skipped, bytes_before, module_bytes(module),
        quantized_embeddings, skipped_embeddings, calibration,
    )


def _embedding_ineligible_reason(child: nn.Embedding, config: TextEncoderQuant) -> str | None:
    if type(child) is not nn.Embedding:
        return f"{type(child).__name__} is a subclass of nn.Embedding whose forward may differ"
    if child.weight.device.type == "meta":
        return "weight is on the meta device (not loaded)"
    if hasattr(child, "_hf_hook"):
        return "has an accelerate hook (offloaded); quantize before enabling offload"
    return conversion_error(child, config.embedding_method, config.group_size)


def _swap_embeddings(
    module: nn.Module, config: TextEncoderQuant, swaps: list[_Swap]
) -> tuple[list[str], dict[str, str]]:
    """Swap eligible ``nn.Embedding`` children for :class:`QuantizedEmbedding` (appending to ``swaps``).

    Tables are keyed by their weight tensor, not their module: T5/UMT5 tie ``shared`` and
    ``encoder.embed_tokens`` as two modules holding one Parameter, which is packed once and installed in both
    slots. The originals move to the CPU only once no remaining module uses their weight, so a tied table that
    is skipped under one name stays where it is.
    """
    built: dict[int, QuantizedEmbedding] = {}
    quantized: list[str] = []
    skipped: dict[str, str] = {}
    originals: list[nn.Embedding] = []
    slots = [
        (parent_name, parent, child_name, child)
        for parent_name, parent in module.named_modules(remove_duplicate=False)
        for child_name, child in list(parent._modules.items())
        if isinstance(child, nn.Embedding)
    ]
    for parent_name, parent, child_name, child in slots:
        full_name = f"{parent_name}.{child_name}" if parent_name else child_name
        reason = config.embedding_skip_reason(full_name) or _embedding_ineligible_reason(child, config)
        if reason is not None:
            skipped[full_name] = reason
            continue
        key = id(child.weight)
        if key not in built:
            built[key] = QuantizedEmbedding.from_embedding(child, config.embedding_method, config.group_size)
        parent._modules[child_name] = built[key]
        swaps.append(_Swap(parent, child_name, built[key], child if config.keep_originals_on_cpu else None))
        quantized.append(full_name)
        if config.keep_originals_on_cpu:
            originals.append(child)
    still_used = {id(p) for p in module.parameters()}
    for child in originals:
        if id(child.weight) not in still_used:
            child.to("cpu")
    return quantized, skipped
