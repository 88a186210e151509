"""Triton kernels with plain-PyTorch references (installed as ``vidaccel.kernels``).

Exports resolve lazily: importing this package does not import Triton, so code that only needs a layout type
(e.g. ``BlockLayout``) works anywhere, and tests can set ``TRITON_INTERPRET`` before any kernel is compiled.
"""

import importlib

if __name__ == "kernels":
    # Reached only when a vidaccel checkout's root is on sys.path (e.g. `python -m ...` run inside it): this folder
    # then hides Hugging Face's `kernels` package, which transformers imports when it is installed.
    raise ImportError(
        f"{__file__} was imported as the top-level package 'kernels': the vidaccel checkout's root is on sys.path and "
        "its kernels/ folder hides Hugging Face's 'kernels' package. Run from another directory (or use the "
        "installed console scripts, e.g. .venv/bin/vidaccel), or remove the checkout root from PYTHONPATH."
    )

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
