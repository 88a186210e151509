"""``QuantizedLinear``: a drop-in replacement for ``nn.Linear`` that stores its weight in a low-bit format.

The packed weight, its scales and the optional SINQ column scale are registered buffers, so ``.to(device)`` moves
them and the float weight really is gone. The forward pass optionally rotates the activation (block Hadamard)
and multiplies it by the SINQ column scale, then multiplies by the weight dequantized on the fly in the
activation's dtype. On a CUDA device of compute capability 8.9 or newer, fp8 weights instead go through
``torch._scaled_mm`` with the activation quantized per token to E4M3 (W8A8); any failure there falls back to the
dequantizing path. ``backend`` tells which path the last call took.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from .hadamard import block_hadamard, hadamard_matrix, rotate_weight
from .sinq import SINQ_ITERATIONS, quantize_sinq

METHODS: tuple[str, ...] = ("int8", "int8-sinq", "fp8", "int4", "int4-sinq", "nvfp4", "mxfp4", "nvint4")
# SINQ methods and the storage format they scale (the rest store their own name).
SINQ_METHODS: dict[str, str] = {"int8-sinq": "int8", "int4-sinq": "int4"}
# Methods whose scales come from the least-squares range search (formats module docstring) unless told otherwise.
# Plain int4 stays round-to-nearest over the full range: it is the RTN baseline the SINQ method is measured against.
RANGE_SEARCH_METHODS: tuple[str, ...] = ("int8", "int8-sinq", "int4-sinq")

BACKEND_NOT_RUN = "not_run"
BACKEND_DEQUANT = "dequant_matmul"
BACKEND_FP8_SCALED_MM = "fp8_scaled_mm"


def storage_format(method: str) -> str:
    """The packed weight format a method stores (int4-sinq / int8-sinq store int4 / int8 plus a column scale)."""
    if method not in METHODS:
        raise ValueError(f"unknown text-encoder quantization method {method!r}; known: {', '.join(METHODS)}")
    return SINQ_METHODS.get(method, method)


def required_multiple(method: str, group_size: int = 64, hadamard_block: int | None = None) -> int:
    """What ``in_features`` must be a multiple of for this method (and rotation) to apply."""
    need = formats.required_multiple(storage_format(method), group_size)
    return math.lcm(need, hadamard_block) if hadamard_block else need


class QuantizedLinear(nn.Module):
    """A linear layer with a packed low-bit weight (see the module docstring)."""

    def __init__(
        self,
        packed: formats.PackedWeight,
        bias: torch.Tensor | None,
        *,
        method: str,
        compute_dtype: torch.dtype,
        col_scale: torch.Tensor | None = None,
        hadamard_block: int | None = None,
        allow_scaled_mm: bool = True,
    ) -> None:
        super().__init__()
        if storage_format(method) != packed.format:
            raise ValueError(f"method {method!r} does not store {packed.format!r} weights")
        self.method = method
        self.out_features, self.in_features = packed.shape
        self.block_size = packed.block_size
        self.hadamard_block = hadamard_block
        self.allow_scaled_mm = allow_scaled_mm
        self.backend = BACKEND_NOT_RUN
        self.scaled_mm_error: str | None = None  # why the fp8 fast path was abandoned, if it was
        self._storage_names = tuple(packed.tensors)
        for name, tensor in packed.tensors.items():
            self.register_buffer(name, tensor.contiguous())
        self.register_buffer("col_scale", None if col_scale is None else col_scale.to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # Zero-size tensor whose dtype and device follow ``.to()`` like a float weight would: the compute dtype.
        self.register_buffer("_dtype_marker", torch.empty(0, dtype=compute_dtype), persistent=False)
        self._hadamard_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        method: str,
        group_size: int = 64,
        hadamard_block: int | None = None,
        sinq_iterations: int = SINQ_ITERATIONS,
        allow_scaled_mm: bool = True,
        search_range: bool | None = None,
    ) -> "QuantizedLinear":
        """Quantize ``linear``'s weight (on its own device); ``linear`` itself is left untouched.

        ``search_range`` (int8 / int4 storage only) defaults to ``method in RANGE_SEARCH_METHODS``.
        """
        fmt = storage_format(method)
        if search_range is None:
            search_range = method in RANGE_SEARCH_METHODS
        weight = linear.weight.detach()
        need = required_multiple(method, group_size, hadamard_block)
        if weight.shape[1] % need:
            raise ValueError(
                f"in_features={weight.shape[1]} is not a multiple of {need} "
                f"(method {method}, group size {group_size}, Hadamard block {hadamard_block})"
            )
        w = rotate_weight(weight, hadamard_block) if hadamard_block else weight.to(torch.float32)
        col_scale = None
        if method in SINQ_METHODS:
            packed, col_scale = quantize_sinq(w, group_size, sinq_iterations, fmt=fmt, search_range=search_range)
        else:
            packed = formats.quantize_weight(w, fmt, group_size, search_range)
        return cls(
            packed,
            linear.bias,
            method=method,
            compute_dtype=weight.dtype,
            col_scale=col_scale,
            hadamard_block=hadamard_block,
            allow_scaled_mm=allow_scaled_mm,
        )

    # ------------------------------------------------------------------------------------------------------
    @property
    def packed(self) -> formats.PackedWeight:
        tensors = {name: getattr(self, name) for name in self._storage_names}
        return formats.PackedWeight(
            storage_format(self.method), (self.out_features, self.in_features), self.block_size, tensors
        )

    @property
    def weight(self) -> torch.Tensor:
        """A value-less stand-in (device "meta") with the weight's shape and compute dtype.

        Code that only inspects ``.weight`` keeps working (transformers' T5/UMT5 feed-forward casts its input to
        ``wo.weight.dtype``); reading values from it fails loudly. Use :meth:`dequantized_weight` for values.
        """
        return torch.empty((self.out_features, self.in_features), dtype=self._dtype_marker.dtype, device="meta")

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The effective weight in the original input basis: ``W_hat`` with ``y = x W_hat^T + b``."""
        w = formats.dequantize_weight(self.packed, torch.float32)
        if self.col_scale is not None:
            w = w * self.col_scale[None, :]
        if self.hadamard_block:
            w = rotate_weight(w, self.hadamard_block)  # H is symmetric and orthonormal: (W H) H = W
        return w.to(dtype or self._dtype_marker.dtype)

    def parameter_bytes(self) -> int:
        """Bytes this layer really holds: packed weight, scales, column scale and bias."""
        return sum(t.numel() * t.element_size() for t in self._persistent_tensors())

    def _persistent_tensors(self) -> list[torch.Tensor]:
        names = (*self._storage_names, "col_scale", "bias")
        return [getattr(self, n) for n in names if getattr(self, n) is not None]

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", f"method={self.method}"]
        if self.method in ("int4", "int4-sinq"):
            parts.append(f"group_size={self.block_size}")
        if self.hadamard_block:
            parts.append(f"hadamard_block={self.hadamard_block}")
        parts.append(f"bias={self.bias is not None}")
        return ", ".join(parts)

    def _apply(self, fn, recurse=True):
        # ``module.to(torch.bfloat16)`` would cast every floating buffer, including fp8 codes and the fp16/fp32
        # scales. Keep the storage in its own dtypes (moving devices only) and let the compute dtype follow.
        before = {name: self._buffers[name] for name in (*self._storage_names, "col_scale")}
        result = super()._apply(fn, recurse)
        for name, tensor in before.items():
            if tensor is None:
                continue
            after = self._buffers[name]
            if after.dtype != tensor.dtype:
                self._buffers[name] = tensor.to(device=after.device)
        self._hadamard_cache.clear()
        return result

    # ------------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.hadamard_block:
            h = block_hadamard(h, self.hadamard_block, self._hadamard(h))
        if self.col_scale is not None:
            h = h * self.col_scale.to(h.dtype)
        if self._fp8_fast_path_applies(h):
            try:
                y = self._fp8_scaled_mm(h)
                self.backend = BACKEND_FP8_SCALED_MM
                return y
            except RuntimeError as error:  # unsupported layout/arch in this torch build: use the exact path
                self.scaled_mm_error = str(error).splitlines()[0]
        w = formats.dequantize_weight(self.packed, h.dtype)
        bias = None if self.bias is None else self.bias.to(h.dtype)
        self.backend = BACKEND_DEQUANT
        return F.linear(h, w, bias)

    def _hadamard(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self._hadamard_cache:
            self._hadamard_cache[key] = hadamard_matrix(self.hadamard_block, dtype=x.dtype, device=x.device)
        return self._hadamard_cache[key]

    def _fp8_fast_path_applies(self, h: torch.Tensor) -> bool:
        return (
            self.method == "fp8"
            and self.allow_scaled_mm
            and self.scaled_mm_error is None
            and h.is_cuda
            and h.dtype == torch.bfloat16
            and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(h.device) >= (8, 9)
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
            and h.numel() > 0
        )

    def _fp8_scaled_mm(self, h: torch.Tensor) -> torch.Tensor:
        rows = h.reshape(-1, self.in_features)
        # Per-token activation scale so the largest entry of each row maps to E4M3's 448.
        scale_a = (rows.abs().amax(dim=1, keepdim=True).to(torch.float32) / formats.E4M3_MAX).clamp_min(1e-12)
        a = formats.e4m3_round(rows.to(torch.float32) / scale_a)
        scale_b = self.scale.reshape(1, -1).to(torch.float32)
        y = torch._scaled_mm(
            a, self.qweight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*h.shape[:-1], self.out_features)


def linear_bits_per_weight(model: nn.Module) -> float | None:
    """Stored bits per weight of the quantized linear layers (codes, scales, SINQ column scales; no bias)."""
    stored = weights = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            stored += module.packed.nbytes()
            if module.col_scale is not None:
                stored += module.col_scale.numel() * module.col_scale.element_size()
            weights += module.in_features * module.out_features
    return 8.0 * stored / weights if weights else None
