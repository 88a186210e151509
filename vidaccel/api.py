"""`vidaccel.apply(pipe, preset)` and the handle that undoes it."""

from __future__ import annotations

from typing import Any

from .adapters import for_pipeline
from .context import STEP_CONTEXT_HOOK, StepContextHook
from .errors import AlreadyAcceleratedError
from .hooks import HookAttachment
from .presets import Preset, preset_family, resolve_preset

class AccelHandle:
    """What `apply` returns: `stats()`, `remove()`, and a context manager that removes on exit."""

    def __init__(self, pipe: Any, preset: Preset, adapter, methods: list, attachments: list[HookAttachment]):
        self.pipe = pipe
        self.preset = preset
        self.adapter = adapter
        self.methods = methods
        self._attachments = attachments
        self.removed = False

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "preset": self.preset.name,
            "pipeline": type(self.pipe).__name__,
            "removed": self.removed,
            "steps": self.adapter.context.stats(),
        }
        for config, method in zip(self.preset.methods(), self.methods):
            out[config.role] = {"method": config.name, **method.stats()}
        return out

    def remove(self) -> None:
        """Restore the exact original pipeline. Safe to call more than once."""
        if self.removed:
            return
        errors = []
        for method in reversed(self.methods):
            try:
                method.uninstall()
            except Exception as exc:  # keep restoring the rest; report at the end
                errors.append(exc)
        for attachment in reversed(self._attachments):
            attachment.detach()
        self.removed = True
        if errors:
            raise errors[0]

    def __enter__(self) -> "AccelHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"<vidaccel.AccelHandle {self.preset.name!r} on {type(self.pipe).__name__} ({state})>"


def apply(pipe: Any, preset: "str | Preset" = "dense") -> AccelHandle:
    """Accelerate `pipe` in place with `preset` (a name from `vidaccel.list_presets()`, a `vidaccel.Preset`, or
    the path of a preset JSON file).

    Returns a handle; `handle.remove()` puts every original module, processor and hook back.
    """
    preset = resolve_preset(preset)  # a bad preset fails before the pipeline is looked at
    adapter = for_pipeline(pipe)
    preset = preset.for_family(preset_family(adapter))  # per-family parameters of the combined presets
    existing = active_handle(pipe)
    if existing is not None:
        raise AlreadyAcceleratedError(
            f"this {type(pipe).__name__} is already accelerated by vidaccel ({existing!r}); "
            "call handle.remove() (or vidaccel.active_handle(pipe).remove()) before applying another preset"
        )
    attachments: list[HookAttachment] = []
    methods: list = []
    try:
        for name, transformer in adapter.transformers().items():
            hook = StepContextHook(
                adapter.context, adapter.scheduler, name,
                layout_fn=lambda args, kwargs, t=transformer: adapter.token_layout(t, args, kwargs),
                timestep_fn=adapter.timestep,
            )
            attachments.append(HookAttachment(transformer, hook, STEP_CONTEXT_HOOK))
        for config in preset.methods():
            method = config.build()
            methods.append(method)  # listed before install so a half-done install is undone too
            method.install(adapter)
    except Exception:
        for method in reversed(methods):
            method.uninstall()
        for attachment in reversed(attachments):
            attachment.detach()
        raise
    handle = AccelHandle(pipe, preset, adapter, methods, attachments)
    for attachment in attachments:  # the handle lives on the pipeline's own modules, not in a global
        attachment.hook.handle = handle
    return handle


def active_handle(pipe: Any) -> AccelHandle | None:
    """The handle of the vidaccel preset currently applied to `pipe`, or None."""
    for transformer in for_pipeline(pipe).transformers().values():
        registry = getattr(transformer, "_diffusers_hook", None)
        hook = registry.get_hook(STEP_CONTEXT_HOOK) if registry is not None else None
        if hook is not None:
            return hook.handle
    return None
