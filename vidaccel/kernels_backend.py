"""Which attention kernel path runs on this machine, decided once."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def kernel_backend() -> str:
    """"triton-cuda" on a CUDA GPU with Triton, "triton-interpreter" when TRITON_INTERPRET=1 (tests),
    else "torch-reference" (sparse methods then run their plain-PyTorch reference path: correct but slow)."""
    import torch

    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch-reference"
    if torch.cuda.is_available():
        return "triton-cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "triton-interpreter"
    return "torch-reference"


def use_triton_kernels(x) -> bool:
    """Whether sparse methods run their Triton kernels on tensor `x` (CUDA, or the interpreter in tests) rather than
    the plain-PyTorch references."""
    backend = kernel_backend()
    return backend != "torch-reference" and (x.is_cuda or backend == "triton-interpreter")
