"""DBCache: always run the first Fn blocks (the probe) and the last Bn blocks (the corrector); skip the middle
blocks when the probe says the step changes little, and replay their cached residual instead.

Per transformer call, with ``x`` the block stack's input and ``p`` the probe's output, the probe residual is
``r = p - x``. It is compared with the probe residual of the last step whose middle was computed (same
transformer, same CFG branch): ``diff = mean|r - r_ref| / mean|r_ref|``. When ``diff < threshold`` and no veto
applies (warm-up, max cached steps, max consecutive cached steps, nothing cached yet), the middle blocks do not
run and ``p + R`` is passed to the corrector, with ``R`` the middle residual (middle output - middle input) of
that computed step, or its TaylorSeer forecast. Joint-attention models (HunyuanVideo, CogVideoX) carry a text
stream through the blocks too; its middle residual is cached and replayed alongside, and the decision reads the
video stream.

The reference is the probe residual of the last *computed* step, not of the previous step: comparing with the
previous step would let a slow drift pass the threshold at every step and cache forever, while the cached
residual grows ever older; measuring from the step the residual belongs to bounds that drift (diffusers'
FirstBlockCache does the same).

Host syncs: the comparison with the threshold needs the diff on the host, so each transformer call whose
decision is not already fixed by a veto costs exactly one ``.item()`` (made once, at the probe's end, never
per block). Vetoed calls (warm-up, limits, first step) cost none; their diffs stay on the device until
``stats()`` is read.

State is kept per (transformer, CFG branch) -- Wan 2.2's two experts and cond/uncond never mix; batched CFG
("cond_uncond") is one state -- and is dropped at the start of every generation.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import torch

from ..hooks import HookAttachment
from ..method import AccelMethod, MethodConfig
from .block_skip import SkippableSpan, StackInputHook, Streams
from .forecast import ResidualForecaster
from .step_log import StepLog

DEFAULT_FN = 8
_HOOK_NAME = "vidaccel.dbcache"
_ENTRY_HOOK_NAME = "vidaccel.dbcache.stack_input"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DBCache(MethodConfig):
    """Dual-block cache. ``Fn``: probe blocks always computed (None: 8, reduced to half the blocks on shallow
    models); ``Bn``: corrector blocks always computed; ``threshold``: cache when the probe's relative L1 change is
    below it; ``warmup_steps``: the first calls of each transformer and branch are always computed;
    ``max_cached_steps`` / ``max_consecutive_cached``: limits per transformer and branch per generation (-1: no
    limit); ``taylorseer_order``: 0 replays the cached residual, 1 or 2 forecasts it from earlier computed ones."""

    role = "cache"
    name = "dbcache"

    Fn: int | None = None
    Bn: int = 0
    threshold: float = 0.08
    warmup_steps: int = 8
    max_cached_steps: int = -1
    max_consecutive_cached: int = -1
    taylorseer_order: int = 0

    def __post_init__(self):
        if self.Fn is not None and (not _is_int(self.Fn) or self.Fn < 1):
            raise ValueError(f"DBCache Fn must be a positive integer (the probe needs a block) or None, got {self.Fn!r}")
        if not _is_int(self.Bn) or self.Bn < 0:
            raise ValueError(f"DBCache Bn must be a non-negative integer, got {self.Bn!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"DBCache threshold must be a finite number >= 0, got {self.threshold!r}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"DBCache warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        for field in ("max_cached_steps", "max_consecutive_cached"):
            value = getattr(self, field)
            if not _is_int(value) or value < -1:
                raise ValueError(f"DBCache {field} must be an integer >= 0, or -1 for no limit, got {value!r}")
        if self.taylorseer_order not in (0, 1, 2) or isinstance(self.taylorseer_order, bool):
            raise ValueError(f"DBCache taylorseer_order must be 0 (off), 1 or 2, got {self.taylorseer_order!r}")

    def block_split(self, num_blocks: int, where: str = "the transformer") -> tuple[int, int]:
        """(Fn, Bn) for a transformer with `num_blocks` blocks; at least one middle block must remain."""
        fn = self.Fn if self.Fn is not None else max(1, min(DEFAULT_FN, (num_blocks - self.Bn) // 2))
        if fn + self.Bn >= num_blocks:
            given = f"Fn={self.Fn}" if self.Fn is not None else f"Fn=None (resolved to {fn})"
            raise ValueError(
                f"DBCache({given}, Bn={self.Bn}) leaves no middle blocks to cache in {where}, which has "
                f"{num_blocks} blocks: Fn + Bn must be at most {num_blocks - 1}"
            )
        return fn, self.Bn

    def build(self) -> "DBCacheMethod":
        return DBCacheMethod(self)


def relative_l1(now: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``mean|now - reference| / mean|reference|`` as a 0-d float32 tensor on the device (no host sync)."""
    change = (now - reference).abs().mean(dtype=torch.float32)
    return change / reference.abs().mean(dtype=torch.float32)


class DBCacheState:
    """Decisions and cached residuals of one (transformer, branch) within one generation."""

    def __init__(self, config: DBCache):
        self.config = config
        self.reference_probe: torch.Tensor | None = None  # probe residual of the last computed step
        self.forecaster = ResidualForecaster(config.taylorseer_order)
        self.calls = 0
        self.cached_total = 0
        self.consecutive_cached = 0
        self.probe_diffs: list[tuple[int, torch.Tensor | float | None]] = []  # device tensors until read
        self.vetoes: collections.Counter[str] = collections.Counter()

    def veto(self, probe: torch.Tensor) -> str | None:
        """Why this call must compute whatever the probe says, or None."""
        config = self.config
        if self.reference_probe is None or not self.forecaster.ready:
            return "nothing_cached"
        if self.reference_probe.shape != probe.shape:
            return "shape_changed"
        if self.calls < config.warmup_steps:
            return "warmup"
        if 0 <= config.max_cached_steps <= self.cached_total:
            return "max_cached_steps"
        if 0 <= config.max_consecutive_cached <= self.consecutive_cached:
            return "max_consecutive_cached"
        return None

    def decide(self, step: int, probe: torch.Tensor) -> bool:
        """True to skip the middle blocks at this call. At most one host sync."""
        veto = self.veto(probe)
        diff = None
        if self.reference_probe is not None and self.reference_probe.shape == probe.shape:
            diff = relative_l1(probe, self.reference_probe).detach()
        if veto is None:
            value = diff.item()  # the one host sync of this transformer call
            self.probe_diffs.append((step, value))
            cache = value < self.config.threshold  # NaN (an all-zero reference) computes
        else:
            self.probe_diffs.append((step, diff))
            self.vetoes[veto] += 1
            cache = False
        self.calls += 1
        if cache:
            self.cached_total += 1
            self.consecutive_cached += 1
        else:
            self.consecutive_cached = 0
            self.reference_probe = probe
        return cache

    def diffs_for_stats(self) -> list[list]:
        out = []
        for step, diff in self.probe_diffs:
            value = float(diff) if diff is not None else None
            out.append([step, value if value is None or math.isfinite(value) else str(value)])
        return out


class DBCacheMethod(AccelMethod):
    """Installed DBCache: a stack-input hook on each transformer's first block and a skippable middle span."""

    def __init__(self, config: DBCache):
        self.config = config
        self.context = None
        self._entries: dict[str, tuple[HookAttachment, StackInputHook]] = {}  # transformer name -> (attachment, hook)
        self._spans: dict[str, SkippableSpan] = {}
        self.splits: dict[str, tuple[int, int, int]] = {}  # transformer name -> (Fn, Bn, blocks)
        self._states: dict[tuple[str, str], DBCacheState] = {}
        self.log = StepLog()

    def install(self, adapter) -> None:
        self.context = adapter.context
        adapter.context.on_new_generation(self._on_new_generation)
        try:
            for name, transformer in adapter.transformers().items():
                blocks = adapter.blocks(transformer)
                fn, bn = self.config.block_split(
                    len(blocks), f"{name} ({type(transformer).__name__})")
                entry = StackInputHook()
                self._entries[name] = (HookAttachment(blocks[0], entry, _ENTRY_HOOK_NAME, root=transformer), entry)
                self._spans[name] = SkippableSpan(self, name, transformer, blocks, fn, len(blocks) - bn, _HOOK_NAME)
                self.splits[name] = (fn, bn, len(blocks))
        except Exception:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        for span in reversed(list(self._spans.values())):
            span.detach()
        self._spans.clear()
        for attachment, _ in reversed(list(self._entries.values())):
            attachment.detach()
        self._entries.clear()
        self._states.clear()

    def _on_new_generation(self, generation: int) -> None:
        self._states.clear()
        self.log.start_generation(generation)

    def _state(self, transformer_name: str, branch: str) -> DBCacheState:
        key = (transformer_name, branch)
        if key not in self._states:
            self._states[key] = DBCacheState(self.config)
        return self._states[key]

    # --- SpanOwner --------------------------------------------------------------------------------------------
    def residual_to_replay(self, span: SkippableSpan, span_input: Streams) -> Streams | None:
        ctx = self.context
        entry = self._entries[span.transformer_name][1]
        probe = span_input.hidden - entry.stack_input.hidden
        entry.stack_input = None  # not needed past the probe; do not hold a hidden-state tensor between calls
        state = self._state(span.transformer_name, ctx.branch)
        cache = state.decide(ctx.step_index, probe)
        self.log.record(span.transformer_name, ctx.branch, ctx.step_index, cache)
        return state.forecaster.predict(ctx.step_index) if cache else None

    def store_residual(self, span: SkippableSpan, residual: Streams) -> None:
        ctx = self.context
        self._state(span.transformer_name, ctx.branch).forecaster.update(ctx.step_index, residual)

    # --- stats ------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        extra = {key: {"probe_diffs": state.diffs_for_stats(), "vetoes": dict(state.vetoes)}
                 for key, state in self._states.items()}
        return {
            "config": self.config.to_dict(),
            "blocks": {name: {"Fn": fn, "Bn": bn, "middle": total - fn - bn, "total": total}
                       for name, (fn, bn, total) in self.splits.items()},
            **self.log.to_dict(extra),
        }
