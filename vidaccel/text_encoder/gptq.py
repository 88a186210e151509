"""GPTQ: data-aware rounding of a linear layer's weight, for every text-encoder weight format.

Round-to-nearest quantizes each weight on its own. GPTQ (Frantar et al. 2022) quantizes a layer's input columns
one after another and, after each column, moves that column's rounding error onto the columns not quantized yet,
weighted so that the layer's *output* error on the calibration inputs stays small. With ``X`` the layer's inputs
(real tokens of the calibration prompts, one row per token) the output error of a weight change ``dW`` is
``||X dW^T||^2 = tr(dW H dW^T) / 2`` with ``H = 2 X^T X / n``. For the upper Cholesky factor ``U`` of ``H^-1``
(damped: ``H + lambda I`` with ``lambda = damp * mean(diag H)``), quantizing column ``j`` to ``q`` and updating

    W[:, k] -= (w_j - q) / U[j, j] * U[j, k]     for every later column k

is the optimal correction of the remaining columns. Columns are processed in blocks of :data:`BLOCK_COLUMNS`: the
updates inside a block are applied at once per column, the block's accumulated error reaches the later columns
in one matrix product at the block's end (the "lazy batch" of the paper). With ``act_order`` the columns go in
order of decreasing ``diag(H)`` (the most active inputs first, while there is the most freedom left to absorb their
error). A column never moves in storage: groups stay runs of consecutive input columns as the packed formats need.

Scales. A scale block (an int4 group, an NVFP4/NVINT4 block of 16, an MXFP4 block of 32, or a whole row for the
per-row formats) gets its parameters when GPTQ reaches its first column: they are computed, by the same rule as the
data-free path (RTN range, or the least-squares range search where the method uses it), from the *current* weights
of that block, i.e. the original weights plus every error update received so far (pending lazy updates included).
With a diagonal ``H`` no error moves and the result is bit for bit the data-free one, except for MXFP4 (below).
NVFP4 / NVINT4's tensor scale comes from the whole weight before GPTQ starts.

MXFP4's exponent. The data-free OCP rule ``floor(log2 amax) - 2`` puts a block's largest value in [4, 8) scale
units, so up to a quarter of its range saturates at 6. Under GPTQ that clipping is not a bounded rounding error:
it is fed back into the unquantized columns, which grow, saturate in turn (after error feedback values reached 17
scale units on all-MiniLM-L6-v2) and feed back more; the weights then fit the calibration activations but a few
tokens of unseen long prompts collapsed (cosine near 0). So GPTQ picks, per block from its current weights, the
OCP exponent or the next one up (which cannot saturate them), whichever rounds the block with less squared error
(:func:`formats.mxfp4_searched_exponent`): the same storage and grid, only another scale byte. With a diagonal
``H`` the result is therefore that searched-exponent RTN, not the data-free bytes.

SINQ (``int4-sinq`` / ``int8-sinq``): the column scale ``c`` comes from the weight exactly as without calibration;
the layer computes ``(x * c) @ (W / c)^T``, so GPTQ quantizes ``W / c`` against the Hessian of ``x * c``, which is
``diag(c) H diag(c)``. Hadamard rotation likewise: ``W R`` against ``R H R``. The packed storage (tensors, dtypes,
shapes, column scale) is exactly the data-free path's; only the chosen codes and scales differ.

Calibration of a whole encoder (:func:`calibrate_sequentially`) is sequential: the layers are grouped into stages
in call order, a stage being the layers that read the very same input tensor (q/k/v; T5's wi_0/wi_1). For each
stage the calibration prompts run through the encoder, in which all earlier stages are already quantized, forward
pre-hooks accumulate ``X^T X`` over the real (non-padding) tokens, and the forward stops as soon as the stage has
seen its inputs. Everything runs on the encoder's own device, deterministically (stable sorts, no sampling).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import formats
from .formats import PackedWeight
from .hadamard import block_hadamard, rotate_weight
from .quantized_linear import RANGE_SEARCH_METHODS, SINQ_METHODS, QuantizedLinear, required_multiple, storage_format
from .sinq import SINQ_FORMATS, SINQ_ITERATIONS, sinq_column_scale

CALIBRATION_METHODS: tuple[str, ...] = ("gptq",)
DEFAULT_CALIBRATION_PROMPTS_PATH = Path(__file__).with_name("calibration_prompts.json")
BLOCK_COLUMNS = 128  # lazy-batch width (a multiple of every group size)
CALIBRATION_BATCH_SIZE = 8
CALIBRATION_MAX_TOKENS = 512  # pipelines encode at most this many tokens
# Cholesky of the damped Hessian: if it fails numerically, retry with the damping multiplied by 10 this often.
DAMP_RETRIES = 4


def load_calibration_prompts() -> list[str]:
    """The shipped calibration prompts (disjoint from the evaluation set in ``prompts.json``)."""
    data = json.loads(DEFAULT_CALIBRATION_PROMPTS_PATH.read_text(encoding="utf-8"))
    return list(data["prompts"])


# ----------------------------------------------------------------------------------------------------------
# Column quantizers: one scale-block rule per storage format


class ColumnQuantizer:
    """Quantizes one input column at a time with the scales of its block (see the module docstring).

    ``block`` is the number of consecutive input columns that share a scale. :meth:`start_block` sets a block's
    scales from the block's current weights ``(out, block)``; :meth:`quantize_column` returns the dequantized
    column and records its codes; :meth:`packed` builds the storage once every column is done.
    """

    def __init__(self, out_features: int, in_features: int, block: int, device: torch.device) -> None:
        if in_features % block:
            raise ValueError(f"in_features={in_features} is not a multiple of the block size {block}")
        self.shape = (out_features, in_features)
        self.block = block
        self.device = device
        self.started = torch.zeros(in_features // block, dtype=torch.bool)

    def block_of(self, column: int) -> int:
        return column // self.block

    def start_block(self, index: int, current: torch.Tensor) -> None:
        self._set_block(index, current)
        self.started[index] = True

    def _set_block(self, index: int, current: torch.Tensor) -> None:
        raise NotImplementedError

    def quantize_column(self, column: int, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def packed(self) -> PackedWeight:
        raise NotImplementedError


class Int8Columns(ColumnQuantizer):
    """Per-row symmetric int8 (``formats.quantize_int8``), the row scale optionally range-searched."""

    def __init__(self, out_features, in_features, device, search_range: bool):
        super().__init__(out_features, in_features, in_features, device)
        self.search_range = search_range
        self.codes = torch.zeros(self.shape, dtype=torch.int8, device=device)

    def _set_block(self, index, current):
        self.scale = formats.int8_scale(current, self.search_range)
        self._divisor = formats.safe_divisor(self.scale)

    def quantize_column(self, column, w):
        q = torch.round(w / self._divisor).clamp(-127, 127)
        self.codes[:, column] = q.to(torch.int8)
        return q * self.scale

    def packed(self):
        return PackedWeight("int8", self.shape, self.shape[1], {"qweight": self.codes, "scale": self.scale})


class Fp8Columns(ColumnQuantizer):
    """Per-row E4M3 (``formats.quantize_fp8``)."""

    def __init__(self, out_features, in_features, device):
        super().__init__(out_features, in_features, in_features, device)
        self.codes = torch.zeros(self.shape, dtype=torch.float8_e4m3fn, device=device)

    def _set_block(self, index, current):
        self.scale = formats.fp8_scale(current)
        self._divisor = formats.safe_divisor(self.scale)

    def quantize_column(self, column, w):
        q = formats.e4m3_round(w / self._divisor)
        self.codes[:, column] = q
        return q.to(torch.float32) * self.scale

    def packed(self):
        return PackedWeight("fp8", self.shape, self.shape[1], {"qweight": self.codes, "scale": self.scale})


class Int4Columns(ColumnQuantizer):
    """Asymmetric int4 per group (``formats.quantize_int4``), RTN range or least-squares range search."""

    def __init__(self, out_features, in_features, group_size, device, search_range: bool):
        super().__init__(out_features, in_features, group_size, device)
        self.search_range = search_range
        groups = in_features // group_size
        self.scale = torch.zeros((out_features, groups), dtype=torch.float16, device=device)
        self.zero = torch.zeros((out_features, groups), dtype=torch.float16, device=device)
        self.codes = torch.zeros(self.shape, dtype=torch.uint8, device=device)

    def _set_block(self, index, current):
        params = formats.int4_searched_params if self.search_range else formats.int4_group_params
        scale, zero = params(current, self.block)
        self.scale[:, index], self.zero[:, index] = scale[:, 0], zero[:, 0]
        self._s, self._z = scale[:, 0].to(torch.float32), zero[:, 0].to(torch.float32)
        self._index = index

    def quantize_column(self, column, w):
        index = self.block_of(column)
        if index != self._index:  # act-order revisits earlier groups
            self._s, self._z = self.scale[:, index].to(torch.float32), self.zero[:, index].to(torch.float32)
            self._index = index
        q = (torch.round(w / self._s) + self._z).clamp(0, 15)
        self.codes[:, column] = q.to(torch.uint8)
        return (q - self._z) * self._s

    def packed(self):
        return PackedWeight("int4", self.shape, self.block, {
            "qweight": formats.pack_nibbles(self.codes), "scale": self.scale, "zero": self.zero})


class _BlockScaledColumns(ColumnQuantizer):
    """Microscaling 4-bit formats: one effective fp32 scale per (row, block)."""

    def __init__(self, out_features, in_features, block, device):
        super().__init__(out_features, in_features, block, device)
        self.effective = torch.zeros((out_features, in_features // block), dtype=torch.float32, device=device)
        self.codes = torch.zeros(self.shape, dtype=torch.uint8, device=device)

    def _scale(self, column):
        return self.effective[:, self.block_of(column)]


class NvColumns(_BlockScaledColumns):
    """NVFP4 (E2M1 values, ``qmax`` 6) or NVINT4 (integers in [-7, 7]): E4M3 block scale times a tensor scale."""

    def __init__(self, weight: torch.Tensor, fmt: str):
        block = formats.NVFP4_BLOCK if fmt == "nvfp4" else formats.NVINT4_BLOCK
        super().__init__(weight.shape[0], weight.shape[1], block, weight.device)
        self.fmt = fmt
        self.qmax = formats.E2M1_MAX if fmt == "nvfp4" else formats.NVINT4_MAX
        self.tensor_scale = formats.nv_tensor_scale(weight, self.qmax)
        self.block_scale = torch.zeros(self.effective.shape, dtype=torch.float8_e4m3fn, device=weight.device)

    def _set_block(self, index, current):
        scale = formats.nv_block_scale(current.abs().amax(dim=1), self.qmax, self.tensor_scale)
        self.block_scale[:, index] = scale
        self.effective[:, index] = scale.to(torch.float32) * self.tensor_scale

    def quantize_column(self, column, w):
        s = self._scale(column)
        scaled = torch.where(s > 0, w / formats.safe_divisor(s), torch.zeros_like(w))
        if self.fmt == "nvfp4":
            codes = formats.e2m1_encode(scaled)
            self.codes[:, column] = codes
            return formats.e2m1_decode(codes) * s
        values = torch.round(scaled).clamp(-self.qmax, self.qmax)
        self.codes[:, column] = (values + 8).to(torch.uint8)
        return values * s

    def packed(self):
        return PackedWeight(self.fmt, self.shape, self.block, {
            "qweight": formats.pack_nibbles(self.codes), "block_scale": self.block_scale,
            "tensor_scale": self.tensor_scale.reshape(1).to(torch.float32)})


class Mxfp4Columns(_BlockScaledColumns):
    """MXFP4: E2M1 values, power-of-two E8M0 scale per block of 32, exponent from
    :func:`formats.mxfp4_searched_exponent` (OCP's or one up, whichever rounds the block's current weights
    better)."""

    def __init__(self, out_features, in_features, device):
        super().__init__(out_features, in_features, formats.MXFP4_BLOCK, device)
        self.scale_byte = torch.zeros(self.effective.shape, dtype=torch.uint8, device=device)

    def _set_block(self, index, current):
        # Not the data-free OCP exponent alone (see the module docstring): the searched one never saturates the
        # block where saturating costs more than the coarser grid does.
        self.scale_byte[:, index] = formats.e8m0_encode(formats.mxfp4_searched_exponent(current))
        self.effective[:, index] = formats.e8m0_decode(self.scale_byte[:, index])

    def quantize_column(self, column, w):
        s = self._scale(column)
        codes = formats.e2m1_encode(w / s)
        self.codes[:, column] = codes
        return formats.e2m1_decode(codes) * s

    def packed(self):
        return PackedWeight("mxfp4", self.shape, self.block, {
            "qweight": formats.pack_nibbles(self.codes), "scale_e8m0": self.scale_byte})


def column_quantizer(weight: torch.Tensor, fmt: str, group_size: int = 64, search_range: bool = False) -> ColumnQuantizer:
    """The :class:`ColumnQuantizer` of storage format ``fmt`` for a float32 weight (range search: int8 / int4)."""
    out_features, in_features = weight.shape
    if search_range and fmt not in ("int8", "int4"):
        raise ValueError(f"range search applies to int8 and int4, not {fmt!r}")
    if fmt == "int8":
        return Int8Columns(out_features, in_features, weight.device, search_range)
    if fmt == "fp8":
        return Fp8Columns(out_features, in_features, weight.device)
    if fmt == "int4":
        if group_size not in formats.INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {formats.INT4_GROUP_SIZES}, got {group_size}")
        return Int4Columns(out_features, in_features, group_size, weight.device, search_range)
    if fmt in ("nvfp4", "nvint4"):
        return NvColumns(weight, fmt)
    if fmt == "mxfp4":
        return Mxfp4Columns(out_features, in_features, weight.device)
    raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(formats.FORMATS)}")


# ----------------------------------------------------------------------------------------------------------
# The GPTQ loop


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` (``lambda = damp * mean diag H``), float64.

    Returns ``(U, damp used)``; the damping grows tenfold per failed factorisation (at most
    :data:`DAMP_RETRIES` times) before giving up with a ``RuntimeError``.
    """
    h = hessian.to(torch.float64)
    mean_diag = float(h.diagonal().mean())
    if not math.isfinite(mean_diag):
        raise RuntimeError("the Hessian holds NaN or inf (non-finite activations in the calibration pass)")
    mean_diag = mean_diag if mean_diag > 0 else 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    used = damp
    for _ in range(DAMP_RETRIES + 1):
        factor, info = torch.linalg.cholesky_ex(h + used * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, used
        used *= 10.0
    raise RuntimeError(f"the damped Hessian is not positive definite even with damp={used / 10:g}")


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: ColumnQuantizer,
    damp: float = 0.01,
    act_order: bool = True,
    block_columns: int = BLOCK_COLUMNS,
) -> torch.Tensor:
    """Run GPTQ on ``weight`` ``(out, in)`` with the input Hessian ``hessian`` ``(in, in)``; the codes land in
    ``quantizer`` (``quantizer.packed()`` gives the storage). Returns the dequantized weight (float32)."""
    w = weight.detach().to(torch.float32)
    out_features, n = w.shape
    if hessian.shape != (n, n):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match in_features={n}")
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    # Inputs that never fired carry no information: a unit diagonal makes them plain RTN, their error stays put.
    diag = h.diagonal()
    diag[diag <= 0] = 1.0
    if act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
    else:
        perm = torch.arange(n, device=w.device)
    inv_perm = torch.argsort(perm)
    upper, _ = inverse_hessian_factor(h[perm][:, perm], damp)
    upper = upper.to(torch.float32)
    work = w[:, perm].clone()
    result = torch.empty_like(work)
    order = perm.tolist()
    position = inv_perm.tolist()
    for i1 in range(0, n, block_columns):
        i2 = min(i1 + block_columns, n)
        w1 = work[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for k in range(i2 - i1):
            column = order[i1 + k]
            index = quantizer.block_of(column)
            if not quantizer.started[index]:
                quantizer.start_block(index, _current_block(quantizer, index, work, w1, err1, upper, i1, k, position))
            col = w1[:, k]
            q = quantizer.quantize_column(column, col)
            result[:, i1 + k] = q
            e = (col - q) / u1[k, k]
            if k + 1 < i2 - i1:
                w1[:, k + 1 :].addr_(e, u1[k, k + 1 :], alpha=-1.0)
            err1[:, k] = e
        if i2 < n:
            work[:, i2:].addmm_(err1, upper[i1:i2, i2:], alpha=-1.0)
    return result[:, inv_perm]


def _current_block(quantizer, index, work, w1, err1, upper, i1, k, position) -> torch.Tensor:
    """The current weights ``(out, block)`` of scale block ``index``, whose columns are all still unquantized:
    those inside the running lazy block from ``w1``, the later ones from ``work`` minus the pending updates."""
    start = index * quantizer.block
    pos = torch.tensor(position[start : start + quantizer.block], device=work.device)
    i2 = i1 + w1.shape[1]
    current = torch.empty((work.shape[0], pos.numel()), dtype=work.dtype, device=work.device)
    inside = pos < i2
    if bool(inside.any()):
        current[:, inside] = w1[:, pos[inside] - i1]
    if not bool(inside.all()):
        later = pos[~inside]
        pending = err1[:, :k] @ upper[i1 : i1 + k][:, later] if k else 0.0
        current[:, ~inside] = work[:, later] - pending
    return current


# ----------------------------------------------------------------------------------------------------------
# One linear layer


def rotate_hessian(hessian: torch.Tensor, block: int) -> torch.Tensor:
    """``R H R`` for the block Hadamard ``R`` (symmetric): the Hessian of the rotated input ``x R``."""
    h = hessian.to(torch.float32)
    return block_hadamard(block_hadamard(h, block).transpose(0, 1).contiguous(), block)


@torch.no_grad()
def quantize_linear_gptq(
    linear: nn.Linear,
    method: str,
    hessian: torch.Tensor,
    *,
    group_size: int = 64,
    hadamard_block: int | None = None,
    sinq_iterations: int = SINQ_ITERATIONS,
    allow_scaled_mm: bool = True,
    search_range: bool | None = None,
    damp: float = 0.01,
    act_order: bool = True,
) -> QuantizedLinear:
    """Like :meth:`QuantizedLinear.from_linear`, with the rounding chosen by GPTQ against ``hessian``, the
    ``(in, in)`` Hessian (any positive multiple of ``X^T X``) of the layer's unrotated, unscaled input."""
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
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or inf; refusing to quantize it")
    w = rotate_weight(weight, hadamard_block) if hadamard_block else weight.to(torch.float32)
    h = hessian.to(device=w.device, dtype=torch.float32)
    if hadamard_block:
        h = rotate_hessian(h, hadamard_block)
    col_scale = None
    if method in SINQ_METHODS:
        col_scale = sinq_column_scale(w, group_size if SINQ_FORMATS[fmt] else None, sinq_iterations)
        w = w / col_scale[None, :]
        h = h * col_scale[:, None] * col_scale[None, :]
    quantizer = column_quantizer(w, fmt, group_size, search_range)
    gptq_quantize(w, h, quantizer, damp=damp, act_order=act_order)
    return QuantizedLinear(
        quantizer.packed(),
        linear.bias,
        method=method,
        compute_dtype=weight.dtype,
        col_scale=col_scale,
        hadamard_block=hadamard_block,
        allow_scaled_mm=allow_scaled_mm,
    )


# ----------------------------------------------------------------------------------------------------------
# Calibration data and the sequential pass over an encoder


@dataclasses.dataclass
class CalibrationBatch:
    inputs: dict[str, torch.Tensor]  # what the encoder's forward gets (input_ids, attention_mask)
    mask: torch.Tensor  # (batch, tokens) bool: the real tokens


def tokenize_calibration(
    tokenizer: Any,
    prompts: Sequence[str],
    device: torch.device | str,
    max_length: int | None = None,
    batch_size: int = CALIBRATION_BATCH_SIZE,
) -> list[CalibrationBatch]:
    """Token batches of ``prompts`` (sorted by length, so that little padding is computed) on ``device``."""
    if not prompts:
        raise ValueError("GPTQ calibration needs at least one prompt")
    limit = max_length or min(int(getattr(tokenizer, "model_max_length", CALIBRATION_MAX_TOKENS)),
                              CALIBRATION_MAX_TOKENS)
    lengths = [len(tokenizer(p, truncation=True, max_length=limit)["input_ids"]) for p in prompts]
    ordered = [prompts[i] for i in sorted(range(len(prompts)), key=lambda i: (lengths[i], i))]
    batches = []
    for start in range(0, len(ordered), batch_size):
        tokens = tokenizer(list(ordered[start : start + batch_size]), padding="longest", truncation=True,
                           max_length=limit, return_tensors="pt")
        mask = tokens["attention_mask"].to(device=device, dtype=torch.bool)
        inputs = {"input_ids": tokens["input_ids"].to(device), "attention_mask": tokens["attention_mask"].to(device)}
        batches.append(CalibrationBatch(inputs, mask))
    return batches


class _StopForward(Exception):
    """Raised by a hook once the current stage has seen its inputs: the rest of the forward is not needed."""


class _HessianHook:
    """Forward pre-hook that adds ``X^T X`` of the real tokens' inputs (float32, on the input's device)."""

    def __init__(self, members: set[int], stop_early: bool) -> None:
        self.members = members
        self.stop_early = stop_early
        self.hessian: torch.Tensor | None = None
        self.tokens = 0
        self.mask: torch.Tensor | None = None
        self.seen: set[int] = set()
        self.last_input: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        if x is not self.last_input:  # q, k and v read the same tensor: count it once
            self.last_input = x
            rows = x.detach()
            mask = self.mask
            if mask is not None and rows.dim() == mask.dim() + 1 and rows.shape[:-1] == mask.shape:
                rows = rows[mask.to(rows.device)]
            rows = rows.reshape(-1, rows.shape[-1]).to(torch.float32)
            if self.hessian is None:
                self.hessian = torch.zeros((rows.shape[1], rows.shape[1]), dtype=torch.float32, device=rows.device)
            self.hessian.addmm_(rows.T, rows)
            self.tokens += rows.shape[0]
        self.seen.add(id(module))
        if self.stop_early and self.seen >= self.members:
            raise _StopForward


def _forward(module: nn.Module, batch: CalibrationBatch) -> None:
    try:
        module(**batch.inputs)
    except _StopForward:
        pass


def _stages(module: nn.Module, layers: Sequence[nn.Linear], batch: CalibrationBatch) -> tuple[list[list[nn.Linear]], dict[int, int]]:
    """Layers grouped into stages in call order (consecutive calls on the same input tensor share a stage), and
    how often each layer ran in one forward; layers that never ran are left out."""
    calls: list[tuple[nn.Linear, bool]] = []  # (layer, reads the same tensor as the call before)
    previous: list[torch.Tensor | None] = [None]  # only the last input is kept alive

    def record(layer: nn.Module, args: tuple) -> None:
        calls.append((layer, args[0] is previous[0]))
        previous[0] = args[0]

    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        _forward(module, batch)
    finally:
        for handle in handles:
            handle.remove()
        previous[0] = None
    counts: dict[int, int] = {}
    stages: list[list[nn.Linear]] = []
    for layer, same_input in calls:
        counts[id(layer)] = counts.get(id(layer), 0) + 1
        if counts[id(layer)] == 1:
            if stages and same_input:
                stages[-1].append(layer)
            else:
                stages.append([layer])
    return stages, counts


@dataclasses.dataclass
class CalibrationStats:
    prompts: int
    tokens: int  # real tokens per calibration pass
    stages: int
    forward_passes: int
    uncalibrated: list[int]  # ids of layers the calibration prompts never reached (quantized data-free)

    def to_dict(self, names: dict[int, str] | None = None) -> dict[str, Any]:
        names = names or {}
        return {"prompts": self.prompts, "tokens": self.tokens, "stages": self.stages,
                "forward_passes": self.forward_passes,
                "uncalibrated": [names.get(i, str(i)) for i in self.uncalibrated]}


@torch.no_grad()
def calibrate_sequentially(
    module: nn.Module,
    layers: Sequence[nn.Linear],
    batches: Sequence[CalibrationBatch],
    quantize_layer: Callable[[nn.Linear, torch.Tensor | None], None],
) -> CalibrationStats:
    """Quantize ``layers`` of ``module`` stage by stage (module docstring).

    ``quantize_layer(layer, hessian)`` must quantize ``layer`` and install the result in ``module`` before it
    returns, so that the next stage sees the quantized outputs; it gets ``hessian=None`` for layers the
    calibration never reached (to be quantized data-free). The encoder runs in eval mode during calibration and
    its modules' training flags are put back afterwards.
    """
    if not batches:
        raise ValueError("GPTQ calibration needs at least one batch of prompts")
    training = {m: m.training for m in module.modules()}
    module.eval()
    try:
        stages, counts = _stages(module, layers, batches[0])
        passes = 1
        tokens = 0
        for stage in stages:
            members = {id(layer) for layer in stage}
            hook = _HessianHook(members, stop_early=all(counts[i] == 1 for i in members))
            handles = [layer.register_forward_pre_hook(hook) for layer in stage]
            try:
                for batch in batches:
                    hook.mask, hook.seen, hook.last_input = batch.mask, set(), None
                    _forward(module, batch)
                    passes += 1
            finally:
                for handle in handles:
                    handle.remove()
            hook.last_input = hook.mask = None
            tokens = max(tokens, hook.tokens)
            hessian = hook.hessian * (2.0 / max(hook.tokens, 1))
            for layer in stage:
                quantize_layer(layer, hessian)
            del hessian, hook
        reached = {id(layer) for stage in stages for layer in stage}
        missing = [layer for layer in layers if id(layer) not in reached]
        for layer in missing:
            quantize_layer(layer, None)
    finally:
        for m, flag in training.items():
            m.training = flag
    prompts = sum(int(b.mask.shape[0]) for b in batches)
    return CalibrationStats(prompts, tokens, len(stages), passes, [id(layer) for layer in missing])
