"""Attach and detach diffusers hooks so that removal leaves a module exactly as it was found."""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook


class HookAttachment:
    """One named hook on one module. `detach()` removes it and, when no other hook remains, also the
    instance-level `forward` the registry installed (and the registry itself if vidaccel created it)."""

    def __init__(self, module: torch.nn.Module, hook: ModelHook, name: str, root: torch.nn.Module | None = None):
        self.module = module
        self.name = name
        self.hook = hook
        self._root = root
        self._had_registry = hasattr(module, "_diffusers_hook")
        self._had_forward_attr = "forward" in module.__dict__
        self._original_forward_attr = module.__dict__.get("forward")
        registry = HookRegistry.check_if_exists_or_initialize(module)
        self._registry_was_empty = not registry.hooks
        registry.register_hook(hook, name)
        self._invalidate_parent_cache()
        self.attached = True

    def _invalidate_parent_cache(self) -> None:
        # cache_context walks child registries from a cached list: a new or removed child hook makes it stale
        if self._root is not None and hasattr(self._root, "_diffusers_hook"):
            self._root._diffusers_hook.invalidate_child_registries_cache()

    def detach(self) -> None:
        if not self.attached:
            return
        registry = self.module._diffusers_hook
        registry.remove_hook(self.name, recurse=False)
        if self._registry_was_empty and not registry.hooks:
            # diffusers leaves the original bound `forward` set on the instance; take it off again
            if self._had_forward_attr:
                self.module.forward = self._original_forward_attr
            else:
                self.module.__dict__.pop("forward", None)
            if not self._had_registry:
                del self.module._diffusers_hook
        self._invalidate_parent_cache()
        self.attached = False
