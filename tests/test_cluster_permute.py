"""Cluster permutation (SVG2): sort/offsets on device, Triton gather/scatter vs PyTorch references (interpreter)."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first Triton import: triton.jit reads it at decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vidaccel.kernels import cluster_permute as cp  # noqa: E402
from vidaccel.kernels.cluster_permute import (  # noqa: E402
    cluster_permutation,
    cluster_permutation_reference,
    permute_qkv,
    permute_qkv_reference,
    permute_tokens,
    permute_tokens_reference,
    unpermute_tokens,
    unpermute_tokens_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _labels(batch, heads, n, clusters, seed, dtype=torch.int32, skip=()):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, clusters, (batch, heads, n), generator=gen)
    for c in skip:  # make some clusters empty
        labels[labels == c] = (c + 1) % clusters
    return labels.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_permutation_matches_reference_with_empty_clusters(dtype):
    labels = _labels(2, 3, 97, 11, seed=1, dtype=dtype, skip=(10, 4, 0))
    labels[1, 2] = 7  # one head with a single cluster
    perm = cluster_permutation(labels, 11)
    ref = cluster_permutation_reference(labels, 11)
    assert torch.equal(perm.order, ref.order)
    assert perm.offsets.dtype == torch.int32 and perm.sizes.dtype == torch.int32
    assert torch.equal(perm.offsets, ref.offsets) and torch.equal(perm.sizes, ref.sizes)
    assert perm.offsets[..., 0].eq(0).all() and perm.offsets[..., -1].eq(97).all()
    assert perm.sizes[..., [0, 4, 10]].eq(0).all() and perm.sizes[1, 2, 7] == 97


def test_permutation_is_sorted_and_stable():
    labels = _labels(1, 2, 200, 5, seed=2)
    perm = cluster_permutation(labels, 5)
    permuted = torch.gather(labels, -1, perm.order)
    assert torch.all(permuted[..., 1:] >= permuted[..., :-1])
    same = permuted[..., 1:] == permuted[..., :-1]
    assert torch.all(perm.order[..., 1:][same] > perm.order[..., :-1][same])  # original order kept
    for b, h in ((0, 0), (0, 1)):
        for c in range(5):
            span = perm.order[b, h, perm.offsets[b, h, c]:perm.offsets[b, h, c + 1]]
            assert torch.all(labels[b, h, span] == c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64, 2, 16), (2, 97, 3, 24), (1, 130, 1, 128)])
def test_permute_and_unpermute_match_reference(dtype, shape):
    B, N, H, D = shape
    gen = torch.Generator().manual_seed(N + D)
    x = torch.randn(B, N, H, D, generator=gen).to(DEVICE, dtype)
    perm = cluster_permutation(_labels(B, H, N, 7, seed=N), 7)
    y = permute_tokens(x, perm.order, backend="triton")
    assert y.is_contiguous() and tuple(y.shape) == (B, H, N, D) and y.dtype == dtype
    assert torch.equal(y, permute_tokens_reference(x, perm.order))
    back = unpermute_tokens(y, perm.order, backend="triton")
    assert tuple(back.shape) == (B, N, H, D)
    assert torch.equal(back, x)  # exact round trip
    assert torch.equal(back, unpermute_tokens_reference(y, perm.order))
    # The clusters are contiguous: rows of cluster c are the tokens labelled c, in their original order.
    b, h = B - 1, H - 1
    lo, hi = perm.offsets[b, h, 3].item(), perm.offsets[b, h, 4].item()
    assert torch.equal(y[b, h, lo:hi], x[b, perm.order[b, h, lo:hi], h])


def test_strided_inputs_int32_order_and_small_tiles():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 3, 70, 32, generator=gen).to(DEVICE)
    x = base.transpose(1, 2)  # (B, N, H, D) view of a (B, H, N, D) tensor
    order = cluster_permutation(_labels(2, 3, 70, 6, seed=4), 6).order.to(torch.int32)
    y = torch.empty(2, 3, 70, 32, device=DEVICE)
    cp._launch([(x, y, order)], scatter=False, block_rows=16)
    assert torch.equal(y, permute_tokens_reference(x, order))
    y_strided = y.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, N, D) view, non-contiguous
    assert torch.equal(unpermute_tokens(y_strided, order, backend="triton"), x)


def test_permute_qkv_one_launch_matches_reference():
    gen = torch.Generator().manual_seed(5)
    B, H, D, Nq, Nk = 2, 2, 16, 90, 57  # different query and key lengths
    q = torch.randn(B, Nq, H, D, generator=gen).to(DEVICE, torch.float16)
    k = torch.randn(B, Nk, H, D, generator=gen).to(DEVICE, torch.float16)
    v = torch.randn(B, Nk, H, D, generator=gen).to(DEVICE, torch.float16)
    q_order = cluster_permutation(_labels(B, H, Nq, 5, seed=6), 5).order
    k_order = cluster_permutation(_labels(B, H, Nk, 9, seed=7), 9).order
    outs = permute_qkv(q, k, v, q_order, k_order, backend="triton")
    refs = permute_qkv_reference(q, k, v, q_order, k_order)
    for out, ref in zip(outs, refs):
        assert torch.equal(out, ref)
    assert torch.equal(outs[0], permute_tokens(q, q_order, backend="triton"))


def test_torch_backend_equals_triton():
    x = torch.randn(1, 50, 2, 16, device=DEVICE)
    order = cluster_permutation(_labels(1, 2, 50, 4, seed=8), 4).order
    assert torch.equal(permute_tokens(x, order, backend="torch"), permute_tokens(x, order, backend="triton"))
    y = permute_tokens(x, order, backend="torch")
    assert torch.equal(unpermute_tokens(y, order, backend="torch"), unpermute_tokens(y, order, backend="triton"))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(1, 10, 2, 16, device=DEVICE)
    order = torch.arange(10, device=DEVICE).expand(1, 2, 10)
    with pytest.raises(ValueError, match="batch, heads, tokens"):
        cluster_permutation(torch.zeros(2, 10, dtype=torch.int32), 3)
    with pytest.raises(TypeError, match="int32 or int64"):
        cluster_permutation(torch.zeros(1, 2, 10), 3)
    with pytest.raises(ValueError, match="positive int"):
        cluster_permutation(torch.zeros(1, 2, 10, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match=r"needs order of shape \(1, 2, 10\)"):
        permute_tokens(x, order[..., :9])
    with pytest.raises(ValueError, match=r"\(B, N, H, D\)"):
        permute_tokens(x[0], order)
    with pytest.raises(TypeError, match="order must be int32 or int64"):
        permute_tokens(x, order.float())
    with pytest.raises(ValueError, match=r"\(B, H, N, D\) layout needs order of shape \(1, 10, 2\)"):
        unpermute_tokens(x, order)  # a (B, N, H, D) tensor where (B, H, N, D) is expected
    with pytest.raises(ValueError, match="must share"):
        permute_qkv(x, x.double(), x, order, order)
    with pytest.raises(ValueError, match="backend"):
        permute_tokens(x, order, backend="fast")



# Compiled in a fresh interpreter: under TRITON_INTERPRET=1 the kernels here are not compilable objects.
_HOPPER_COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib.util
spec = importlib.util.spec_from_file_location("cluster_permute", sys.argv[1])  # the file alone: no package imports
cp = importlib.util.module_from_spec(spec)
sys.modules["cluster_permute"] = cp
spec.loader.exec_module(cp)
signature = {}
for name in cp._permute_kernel.arg_names:
    if name.startswith(("src", "dst")):
        signature[name] = "*bf16"
    elif name.startswith("ord"):
        signature[name] = "*i64"
    else:
        signature[name] = "constexpr" if name in ("BLOCK_N", "BLOCK_D", "SCATTER") else "i32"
for scatter in (False, True):
    try:
        source = ASTSource(fn=cp._permute_kernel, signature=signature,
                           constexprs={"BLOCK_N": 64, "BLOCK_D": 128, "SCATTER": scatter})
    except TypeError as exc:
        print("SKIP another Triton API generation:", exc)
        sys.exit(0)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("COMPILED")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernels themselves")
def test_kernel_compiles_for_hopper():
    """Compile the gather and scatter kernels to sm_90 cubins without a GPU (the interpreter checks less)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE, cp.__file__], capture_output=True, text=True, env=env,
                          timeout=300)
    if "SKIP" in done.stdout or "ptxas" in done.stderr and "No such file" in done.stderr:
        pytest.skip(done.stdout + done.stderr[-500:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "COMPILED" in done.stdout
