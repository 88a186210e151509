"""Block Hadamard rotation: orthonormal, exact on a linear layer without quantization."""

import pytest
import torch

from vidaccel.text_encoder.hadamard import block_hadamard, hadamard_matrix, is_power_of_two, rotate_weight


@pytest.mark.parametrize("size", [1, 2, 4, 16, 64, 128, 256])
def test_hadamard_is_orthonormal_symmetric_and_plus_minus(size):
    h = hadamard_matrix(size, dtype=torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(size, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)
    assert torch.allclose(h.abs(), torch.full_like(h, size**-0.5))


@pytest.mark.parametrize("size", [0, 3, 48, 100])
def test_non_power_of_two_is_rejected(size):
    assert not is_power_of_two(size)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(size)


def test_block_rotation_is_an_involution_and_keeps_norms():
    x = torch.randn(3, 5, 256, dtype=torch.float64)
    y = block_hadamard(x, 64)
    assert y.shape == x.shape
    assert torch.allclose(block_hadamard(y, 64), x, atol=1e-12)
    # each 64-block keeps its norm (orthonormal per block)
    assert torch.allclose(y.reshape(3, 5, 4, 64).norm(dim=-1), x.reshape(3, 5, 4, 64).norm(dim=-1))


def test_block_rotation_acts_blockwise():
    x = torch.zeros(1, 128, dtype=torch.float64)
    x[0, 70] = 1.0  # lives in the second 64-block only
    y = block_hadamard(x, 64)
    assert torch.equal(y[0, :64], torch.zeros(64, dtype=torch.float64))
    assert torch.allclose(y[0, 64:].abs(), torch.full((64,), 1 / 8, dtype=torch.float64))


@pytest.mark.parametrize("block", [16, 64, 128])
def test_rotated_layer_is_exact_without_quantization(block):
    g = torch.Generator().manual_seed(block)
    w = torch.randn(96, 256, generator=g, dtype=torch.float64)
    x = torch.randn(7, 256, generator=g, dtype=torch.float64)
    w_rot = block_hadamard(w, block)
    x_rot = block_hadamard(x, block)
    assert torch.allclose(x_rot @ w_rot.T, x @ w.T, atol=1e-10)
    # float32 helper used before quantizing
    assert torch.allclose(rotate_weight(w.to(torch.float32), block), w_rot.to(torch.float32), atol=1e-5)


def test_rotation_spreads_an_outlier():
    w = torch.zeros(1, 64)
    w[0, 5] = 8.0
    r = rotate_weight(w, 64)
    assert r.abs().max().item() == pytest.approx(1.0)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="multiple"):
        block_hadamard(torch.zeros(2, 100), 64)
