"""Skip a contiguous span of transformer blocks and replay its cached residual instead.

A span ``blocks[start:end]`` of one transformer gets one diffusers hook per block. At the first block of the
span its owner (the cache method) decides, once per transformer call, whether the span runs:

* it runs: every block calls its original forward; the last block's hook stores ``span output - span input``
  (per stream) with the owner;
* it is skipped: the first block returns ``span input + residual`` without running, and every other block of
  the span returns its input unchanged, so none of their attention processors, MLPs or norms run and the only
  work is one add per stream.

Video-model blocks carry one or two streams. Wan blocks take the text but return only the video hidden states;
HunyuanVideo (dual- and single-stream) and CogVideoX blocks return ``(hidden_states, encoder_hidden_states)``.
Every family passes the video stream first and the text stream second (by position or by keyword), so reading
the inputs needs no per-family table; what a block returns is learned from the span's first computed call (a
replay always follows a computed call, because a residual only exists after one).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
from diffusers.hooks import ModelHook

from ..adapters.base import call_argument
from ..hooks import HookAttachment


@dataclasses.dataclass
class Streams:
    """The tensors a block carries: the video stream and, for joint-attention blocks, the text stream."""

    hidden: torch.Tensor
    encoder: torch.Tensor | None = None

    def __add__(self, other: "Streams") -> "Streams":
        return Streams(self.hidden + other.hidden, _add_optional(self.encoder, other.encoder))

    def __sub__(self, other: "Streams") -> "Streams":
        encoder = None
        if self.encoder is not None and other.encoder is not None:
            encoder = self.encoder - other.encoder
        return Streams(self.hidden - other.hidden, encoder)


def _add_optional(tensor: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None or residual is None:
        return tensor
    return tensor + residual


def block_inputs(args: tuple, kwargs: dict) -> Streams:
    """The streams a block was called with (video at position 0 / `hidden_states`, text at 1)."""
    return Streams(call_argument(args, kwargs, "hidden_states", 0),
                   call_argument(args, kwargs, "encoder_hidden_states", 1))


def block_outputs(output: Any) -> Streams:
    if isinstance(output, tuple):
        return Streams(output[0], output[1])
    return Streams(output)


class SpanOwner(Protocol):
    """What a cache method provides to the spans it installs."""

    def residual_to_replay(self, span: "SkippableSpan", span_input: Streams) -> Streams | None:
        """Called at the span's first block, once per transformer call: the residual to add instead of running
        the span, or None to run it."""

    def store_residual(self, span: "SkippableSpan", residual: Streams) -> None:
        """Called after a computed span with ``output - input`` of each stream the blocks return."""


class SkippableSpan:
    """Blocks ``[start, end)`` of one transformer, skippable as a unit. Holds only the state of the call in
    progress (transformer calls never interleave); everything kept across calls belongs to the owner."""

    def __init__(self, owner: SpanOwner, transformer_name: str, transformer: torch.nn.Module,
                 blocks: list[torch.nn.Module], start: int, end: int, hook_name: str):
        if not 0 <= start < end <= len(blocks):
            raise ValueError(f"block span [{start}, {end}) does not fit {len(blocks)} blocks")
        self.owner = owner
        self.transformer_name = transformer_name
        self.start, self.end = start, end
        self.returns_pair: bool | None = None  # learned on the first computed call
        self.skipping = False
        self._span_input: Streams | None = None
        self._attachments: list[HookAttachment] = []
        try:
            for index in range(start, end):
                hook = _SpanBlockHook(self, first=index == start, last=index == end - 1)
                self._attachments.append(HookAttachment(blocks[index], hook, hook_name, root=transformer))
        except Exception:
            self.detach()
            raise

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def detach(self) -> None:
        while self._attachments:
            self._attachments.pop().detach()
        self._span_input = None

    def _pack(self, streams: Streams) -> Any:
        """A block's return value for these streams, shaped like the blocks' own outputs."""
        if self.returns_pair:
            return streams.hidden, streams.encoder
        return streams.hidden

    def _enter(self, args: tuple, kwargs: dict) -> Any | None:
        """First block: ask the owner; return the replayed output when skipping, else None (run the blocks)."""
        span_input = block_inputs(args, kwargs)
        if self.returns_pair is False:  # the text stream passes through untouched: no residual for it
            span_input.encoder = None
        residual = self.owner.residual_to_replay(self, span_input)
        self.skipping = residual is not None
        if self.skipping:
            if self.returns_pair is None:
                raise RuntimeError("vidaccel block cache: a residual was offered before the span ever ran")
            self._span_input = None
            return self._pack(span_input + residual)
        self._span_input = span_input
        return None

    def _leave(self, output: Any) -> None:
        """Last block of a computed span: hand ``output - input`` to the owner."""
        self.returns_pair = isinstance(output, tuple)
        span_input, self._span_input = self._span_input, None
        if span_input is None:  # the span was entered without its first block (not a sequential block loop)
            raise RuntimeError("vidaccel block cache: the span's last block ran without its first block")
        if not self.returns_pair:
            span_input.encoder = None
        self.owner.store_residual(self, block_outputs(output) - span_input)


class _SpanBlockHook(ModelHook):
    """Per block of a span: run the block or stand in for it."""

    def __init__(self, span: SkippableSpan, first: bool, last: bool):
        super().__init__()
        self.span = span
        self.first = first
        self.last = last

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        span = self.span
        if self.first:
            replayed = span._enter(args, kwargs)
            if replayed is not None:
                return replayed
        elif span.skipping:
            return span._pack(block_inputs(args, kwargs))
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.last:
            span._leave(output)
        return output


class StackInputHook(ModelHook):
    """On a transformer's first block: keeps a reference to the block stack's input for this call (no copy;
    blocks return new tensors and never modify their inputs in place)."""

    def __init__(self):
        super().__init__()
        self.stack_input: Streams | None = None

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.stack_input = block_inputs(args, kwargs)
        return args, kwargs
