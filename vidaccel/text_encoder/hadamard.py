"""Block Hadamard rotation of a linear layer's input dimension.

With ``H`` the orthonormal Hadamard matrix of size ``b`` (a power of two) and ``R = diag(H, ..., H)``, rotating
the weight offline (``W' = W R``) and the activation online (``x' = x R``) leaves the layer unchanged:
``x' W'^T = x R R^T W^T = x W^T``. The rotation spreads each block's outliers over all its entries, which makes
the block easier to quantize. ``H`` is symmetric, so the same function rotates weights and activations.
"""

from __future__ import annotations

import functools

import torch


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@functools.lru_cache(maxsize=None)
def _hadamard_float64(size: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:  # Sylvester construction: H_2n = [[H, H], [H, -H]]
        h = torch.cat((torch.cat((h, h), dim=1), torch.cat((h, -h), dim=1)), dim=0)
    return h / size**0.5


def hadamard_matrix(
    size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthonormal ``size x size`` Hadamard matrix (``H @ H.T == I``); ``size`` must be a power of two."""
    if not is_power_of_two(size):
        raise ValueError(f"Hadamard block size must be a power of two, got {size}")
    return _hadamard_float64(size).to(dtype=dtype, device=device)


def block_hadamard(x: torch.Tensor, block: int, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the last dimension of ``x`` by ``diag(H_block, ...)``: one batched matmul over a reshape.

    ``matrix`` may pass a prebuilt ``hadamard_matrix(block)`` (already on ``x``'s device and dtype) to avoid
    rebuilding it on every call.
    """
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"last dimension {n} is not a multiple of the Hadamard block {block}")
    if matrix is None:
        matrix = hadamard_matrix(block, dtype=x.dtype, device=x.device)
    blocks = x.reshape(*x.shape[:-1], n // block, block)
    return (blocks @ matrix).reshape(x.shape)


def rotate_weight(weight: torch.Tensor, block: int) -> torch.Tensor:
    """``W R`` in float32 (offline, before quantization)."""
    return block_hadamard(weight.detach().to(torch.float32), block)
