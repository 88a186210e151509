"""Triton kernels with plain-PyTorch references (installed as ``vidaccel.kernels``).

Exports resolve lazily: importing this package does not import Triton, so code that only needs a layout type
(e.g. ``BlockLayout``) works anywhere, and tests can set ``TRITON_INTERPRET`` before any kernel is compiled.
"""

import importlib

_EXPORTS = {
    "BlockLayout": "._block_layout",
    "block_sparse_attention": ".block_sparse_attention",
    "block_sparse_attention_reference": ".block_sparse_attention",
    "merge_attention_partials": ".block_sparse_attention",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
