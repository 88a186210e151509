"""Weights signatures: telling apart two models of one architecture (a model and its retrained version) by the
root-mean-square of a few of their parameters.

A config fingerprint only says which architecture a LeMiCa plan was measured on; the signature says which weights.
It has to survive what does not change the model: a cast to bf16 or fp16 moves an RMS over thousands of weights by
far less than ``1e-3`` relative (rounding errors of opposite signs cancel), and another device only changes the
float32 reduction order (``1e-6`` or less). Retraining moves it by much more. So signatures are compared with a
relative tolerance of ``1e-3``, never for equality.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch

#: Parameters sampled per module by default: enough to see retraining anywhere in the model, cheap to compute.
DEFAULT_COUNT = 16
#: Relative difference of one RMS that counts as other weights; a bf16 cast stays well below it (see module doc).
DEFAULT_REL_TOL = 1e-3
# The RMS of a parameter with few elements moves with a bf16 cast by up to bf16's rounding error (0.4%), since
# there are too few elements for the errors to cancel: such parameters are sampled only when a module has no
# larger ones. With 1024 elements the cast moves the RMS by about 1e-4 (one standard deviation); on the reference
# model a bf16 cast moved these RMS values by 1.1e-4 at most, and all of its parameters' by up to 8.8e-4.
_MIN_ELEMENTS = 1024
# Digits kept per RMS: far finer than the tolerance, short in JSON files.
_SIGNIFICANT_DIGITS = 6

Signature = list[list[Any]]  # [[parameter name, rms], ...] in parameter order


def weights_signature(module: torch.nn.Module, count: int = DEFAULT_COUNT) -> Signature | None:
    """``[name, rms]`` of up to ``count`` parameters evenly spaced over ``module.named_parameters()``.

    The first and the last sampled parameter are always included; parameters with fewer than 1024 elements are
    passed over when larger ones exist, empty and integer ones always. Each RMS is computed in float32 on the
    parameter's own device and all of them come to the host together (one sync per device), rounded to 6
    significant digits.

    Returns None when a sampled parameter lives on the ``meta`` device (an offloaded model): its weights cannot
    be read, so checks against the signature are skipped.
    """
    return weights_signatures([module], count)[0]


def weights_signatures(modules: Iterable[torch.nn.Module], count: int = DEFAULT_COUNT) -> list[Signature | None]:
    """`weights_signature` of each module, all read from the device together: one sync for a whole pipeline."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(f"count must be an integer >= 2 (the first and the last parameter), got {count!r}")
    sampled = [_sampled_parameters(module, count) for module in modules]
    readable = [(index, position, parameter) for index, chosen in enumerate(sampled) if chosen is not None
                for position, (_, parameter) in enumerate(chosen)]
    by_device: dict[torch.device, list[tuple[int, int, torch.Tensor]]] = {}
    for item in readable:
        by_device.setdefault(item[2].device, []).append(item)
    rms: dict[tuple[int, int], float] = {}
    with torch.no_grad():
        for items in by_device.values():
            values = torch.stack([_rms(parameter) for _, _, parameter in items])
            for (index, position, _), value in zip(items, values.cpu().tolist()):  # the one transfer per device
                rms[index, position] = float(f"{value:.{_SIGNIFICANT_DIGITS}g}")
    return [None if chosen is None else [[name, rms[index, position]] for position, (name, _) in enumerate(chosen)]
            for index, chosen in enumerate(sampled)]


def _sampled_parameters(module: torch.nn.Module, count: int) -> list[tuple[str, torch.Tensor]] | None:
    """The (name, parameter) pairs a signature of ``module`` reads; None when one of them is on the meta device."""
    # Integer (quantized) storage has no RMS comparable across formats; such parameters are never sampled.
    nonempty = [(name, parameter) for name, parameter in module.named_parameters()
                if parameter.numel() > 0 and parameter.is_floating_point()]
    eligible = [(name, parameter) for name, parameter in nonempty if parameter.numel() >= _MIN_ELEMENTS] or nonempty
    chosen = [eligible[index] for index in _evenly_spaced(len(eligible), count)]
    return None if any(parameter.device.type == "meta" for _, parameter in chosen) else chosen


def _rms(parameter: torch.Tensor) -> torch.Tensor:
    """RMS as a float32 scalar on the parameter's device, accumulated in float32 (or wider, for float64 weights)."""
    accumulate = torch.promote_types(parameter.dtype, torch.float32)
    norm = torch.linalg.vector_norm(parameter.detach(), dtype=accumulate)
    return (norm / math.sqrt(parameter.numel())).to(torch.float32)


def _evenly_spaced(length: int, count: int) -> list[int]:
    """``min(length, count)`` distinct indices into ``range(length)``, evenly spaced, first and last included."""
    if length <= count:
        return list(range(length))
    # Rounded multiples of (length - 1) / (count - 1) > 1, so they are distinct; integer arithmetic is exact.
    return [(index * (length - 1) + (count - 1) // 2) // (count - 1) for index in range(count)]


def signature_difference(
    ours: Sequence[Sequence[Any]] | None, theirs: Sequence[Sequence[Any]] | None, rel_tol: float = DEFAULT_REL_TOL
) -> str | None:
    """None when two signatures describe the same weights, else what differs first, for a message.

    They match when they sample the same parameter names in the same order and every RMS agrees to ``rel_tol``
    relative. A None signature (weights that could not be read) matches anything: there is nothing to compare.
    """
    if ours is None or theirs is None:
        return None
    our_names, their_names = [name for name, _ in ours], [name for name, _ in theirs]
    if our_names != their_names:
        first = next((index for index, pair in enumerate(zip(our_names, their_names)) if pair[0] != pair[1]),
                     min(len(our_names), len(their_names)))
        return (f"different parameters: {_name_at(our_names, first)} vs {_name_at(their_names, first)} "
                f"at sampled parameter {first + 1}")
    for (name, a), (_, b) in zip(ours, theirs):
        if abs(a - b) > rel_tol * max(abs(a), abs(b), 1e-30):  # the floor keeps two zero weights a match
            return f"RMS of {name} is {a:.6g} vs {b:.6g}"
    return None


def first_transformer_difference(
    ours: Sequence[Sequence[Sequence[Any]] | None], theirs: Sequence[Sequence[Sequence[Any]] | None]
) -> tuple[int, str] | None:
    """(index, difference) of the first transformer whose signatures differ, comparing one signature per
    transformer on each side (equal counts), or None when all match."""
    for index, (our_signature, their_signature) in enumerate(zip(ours, theirs)):
        difference = signature_difference(our_signature, their_signature)  # None signatures (meta weights) match
        if difference is not None:
            return index, difference
    return None


def _name_at(names: Sequence[str], index: int) -> str:
    return repr(names[index]) if index < len(names) else "none"


def checked_signature(signature: Any, where: str) -> tuple[tuple[str, float], ...]:
    """``signature`` as a tuple of ``(name, rms)`` pairs; raises ValueError naming ``where`` when it is not a list
    of ``[parameter name, finite non-negative RMS]`` pairs."""
    if isinstance(signature, (str, bytes)) or not isinstance(signature, Sequence):
        raise ValueError(f"{where} must be a list of [parameter name, RMS] pairs, got {signature!r}")
    pairs = []
    for index, pair in enumerate(signature):
        valid = (
            not isinstance(pair, (str, bytes)) and isinstance(pair, Sequence) and len(pair) == 2
            and isinstance(pair[0], str) and pair[0]
            and isinstance(pair[1], numbers.Real) and not isinstance(pair[1], bool)
            and math.isfinite(pair[1]) and pair[1] >= 0
        )
        if not valid:
            raise ValueError(
                f"{where}[{index}] must be a [parameter name, finite non-negative RMS] pair, got {pair!r}"
            )
        pairs.append((pair[0], float(pair[1])))
    return tuple(pairs)
