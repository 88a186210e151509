"""Batched k-means (SVG2): Triton assignment vs the PyTorch reference (interpreter on CPU), update, driver, sklearn."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first Triton import: triton.jit reads it at decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vidaccel.kernels import kmeans as km  # noqa: E402
from vidaccel.kernels.kmeans import (  # noqa: E402
    batched_kmeans,
    kmeans_assign,
    kmeans_assign_reference,
    kmeans_inertia,
    kmeans_update,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _blobs(batch, heads, n, dim, centers, seed, spread=0.3, dtype=torch.float32):
    """Tokens drawn around a few random centres per (batch, head), like clustered attention queries."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(batch, heads, centers, dim, generator=gen) * 2
    which = torch.randint(0, centers, (batch, heads, n), generator=gen)
    x = torch.gather(means, 2, which[..., None].expand(batch, heads, n, dim))
    x = x + spread * torch.randn(batch, heads, n, dim, generator=gen)
    return x.to(DEVICE, dtype)


def _distances64(x, centroids):
    x64, c64 = x.double(), centroids.double()
    return (x64[:, :, :, None, :] - c64[:, :, None, :, :]).square().sum(-1)  # (B, H, N, C)


def _assert_nearest(x, centroids, labels, rel_tol):
    """Every label is a nearest centroid up to rounding (ties may go either way)."""
    assert labels.dtype == torch.int32 and tuple(labels.shape) == tuple(x.shape[:3])
    dist = _distances64(x, centroids.to(x.dtype) if x.dtype != torch.float32 else centroids)
    chosen = torch.gather(dist, -1, labels.long()[..., None])[..., 0]
    best = dist.min(-1).values
    scale = x.double().square().sum(-1) + centroids.double().square().sum(-1).amax(-1, keepdim=True)
    assert torch.all(chosen - best <= rel_tol * scale), (chosen - best).max()


# ------------------------------------------------------------------------------------------------------------
# Assignment
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2, 77, 16, 5), (2, 1, 130, 24, 37), (1, 1, 64, 64, 70)])
def test_assign_matches_reference(dtype, shape):
    B, H, N, D, C = shape
    gen = torch.Generator().manual_seed(N * D + C)
    x = torch.randn(B, H, N, D, generator=gen).to(DEVICE, dtype)
    centroids = torch.randn(B, H, C, D, generator=gen).to(DEVICE)
    labels = kmeans_assign(x, centroids, backend="triton")
    reference = kmeans_assign_reference(x, centroids)
    _assert_nearest(x, centroids, labels, rel_tol=1e-6 if dtype == torch.float32 else 2e-3)
    _assert_nearest(x, centroids, reference, rel_tol=1e-6 if dtype == torch.float32 else 2e-3)
    assert (labels == reference).float().mean() > 0.95  # random data: exact ties are rare


def test_assign_small_tiles_ragged_and_strided_input():
    """Tiles smaller than N and C (ragged last tiles) and a (B, N, H, D) tensor viewed as (B, H, N, D)."""
    gen = torch.Generator().manual_seed(3)
    x_bnhd = torch.randn(2, 45, 3, 16, generator=gen).to(DEVICE)
    x = x_bnhd.transpose(1, 2)  # strided, not contiguous
    centroids = torch.randn(2, 3, 21, 16, generator=gen).to(DEVICE)
    labels = km._assign_triton(x, centroids, blocks={"BLOCK_N": 16, "BLOCK_C": 16})
    assert torch.equal(labels, kmeans_assign_reference(x.contiguous(), centroids))


def test_assign_ties_go_to_lowest_index():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1, 40, 16, generator=gen).to(DEVICE)
    base = torch.randn(1, 1, 20, 16, generator=gen)
    base[:, :, 17] = base[:, :, 2]  # exact duplicates in different tiles
    base[:, :, 9] = base[:, :, 8]  # and in the same tile
    centroids = base.to(DEVICE)
    for labels in (km._assign_triton(x, centroids, blocks={"BLOCK_N": 16, "BLOCK_C": 16}),
                   kmeans_assign_reference(x, centroids)):
        assert not torch.isin(labels, torch.tensor([9, 17], device=DEVICE)).any()
    x[0, 0, 0] = base[0, 0, 2].to(DEVICE)  # a token sitting on the duplicated centroid
    assert km._assign_triton(x, centroids, blocks={"BLOCK_N": 16, "BLOCK_C": 16})[0, 0, 0] == 2


# ------------------------------------------------------------------------------------------------------------
# Update
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["index_put", "index_add", "sorted"])
def test_update_means_sizes_and_empty_clusters(method, monkeypatch):
    monkeypatch.setattr(km, "_UPDATE_CHUNK_ELEMENTS", 2 * 50 * 8)  # several head chunks
    gen = torch.Generator().manual_seed(5)
    B, H, N, D, C = 2, 3, 50, 8, 6
    x = torch.randn(B, H, N, D, generator=gen).to(DEVICE, torch.float16)
    labels = torch.randint(0, C - 1, (B, H, N), generator=gen, dtype=torch.int32)  # cluster C-1 stays empty
    labels[0, 1] = 0  # all tokens of one head in one cluster: clusters 1.. empty there
    labels = labels.to(DEVICE)
    previous = torch.randn(B, H, C, D, generator=gen).to(DEVICE)
    centroids, sizes = kmeans_update(x, labels, C, previous, method=method)
    assert centroids.dtype == torch.float32 and sizes.dtype == torch.int32
    for b in range(B):
        for h in range(H):
            for c in range(C):
                members = x[b, h][labels[b, h] == c].float()
                assert sizes[b, h, c] == len(members)
                expected = members.mean(0) if len(members) else previous[b, h, c]
                torch.testing.assert_close(centroids[b, h, c], expected, rtol=1e-5, atol=1e-5)
    assert sizes[..., C - 1].eq(0).all() and sizes[0, 1, 0] == N


def test_update_paths_agree():
    x = _blobs(1, 2, 150, 24, 4, seed=6).transpose(2, 3).contiguous().transpose(2, 3)  # strided tokens
    labels = kmeans_assign_reference(x, x[:, :, :7])
    a = kmeans_update(x, labels, 7, x[:, :, :7].float(), method="index_put")
    for method in ("index_add", "sorted"):
        b = kmeans_update(x, labels, 7, x[:, :, :7].float(), method=method)
        torch.testing.assert_close(a[0], b[0])
        assert torch.equal(a[1], b[1])
    # Sorted sums with small row tiles (a cluster spans several tiles) still give the same means.
    c = km._update_sorted(x, labels, 7, x[:, :, :7].float(), block_rows=8)
    torch.testing.assert_close(a[0], c[0])
    assert torch.equal(a[1], c[1])
    with pytest.raises(ValueError, match="method"):
        kmeans_update(x, labels, 7, x[:, :, :7].float(), method="mean")


# ------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------
def test_kmeans_matches_sklearn_inertia():
    from sklearn.cluster import KMeans

    B, H, N, D, C, iters = 1, 3, 300, 16, 6, 15
    x = _blobs(B, H, N, D, centers=8, seed=7, spread=0.8)
    init = km._random_token_init(x, C, seed=11)
    ours = batched_kmeans(x, C, iterations=iters, init_centroids=init, backend="torch")
    inertia = kmeans_inertia(x, ours.labels, ours.centroids)
    for b in range(B):
        for h in range(H):
            data = x[b, h].double().cpu().numpy()
            skl = KMeans(n_clusters=C, init=init[b, h].double().cpu().numpy(), n_init=1, algorithm="lloyd",
                         max_iter=iters, tol=0.0).fit(data)
            assert abs(inertia[b, h].item() - skl.inertia_) <= 0.03 * skl.inertia_, (inertia[b, h], skl.inertia_)
            # Same Lloyd iterations from the same start: the same partition (up to relabelling, here none).
            agree = (ours.labels[b, h].cpu().numpy() == skl.labels_).mean()
            assert agree > 0.97
            np.testing.assert_allclose(np.sort(ours.sizes[b, h].cpu().numpy()),
                                       np.sort(np.bincount(skl.labels_, minlength=C)), atol=N * 0.03)


def test_kmeans_triton_and_torch_backends_agree():
    x = _blobs(1, 2, 96, 16, 5, seed=8)
    a = batched_kmeans(x, 6, iterations=3, seed=1, backend="triton")
    b = batched_kmeans(x, 6, iterations=3, seed=1, backend="torch")
    c = batched_kmeans(x, 6, iterations=3, seed=1, backend="triton", update_method="sorted")
    for other in (b, c):
        assert torch.equal(a.labels, other.labels) and torch.equal(a.sizes, other.sizes)
        torch.testing.assert_close(a.centroids, other.centroids)


def test_sorted_update_hands_over_the_cluster_permutation():
    from vidaccel.kernels.cluster_permute import cluster_permutation

    x = _blobs(2, 2, 90, 16, 5, seed=12)
    result = batched_kmeans(x, 7, iterations=2, seed=4, backend="triton", update_method="sorted")
    expected = cluster_permutation(result.labels, 7)
    assert torch.equal(result.order, expected.order)
    assert torch.equal(result.offsets, expected.offsets)
    assert torch.equal((result.offsets[..., 1:] - result.offsets[..., :-1]).to(result.sizes.dtype), result.sizes)
    # Other updates leave the sort to the caller.
    plain = batched_kmeans(x, 7, iterations=2, seed=4, backend="triton")
    assert plain.order is None and plain.offsets is None


def test_warm_start_continues_and_improves():
    x = _blobs(2, 2, 200, 16, 10, seed=9, spread=1.0)
    cold = batched_kmeans(x, 8, iterations=2, seed=3, backend="torch")
    warm = batched_kmeans(x, 8, iterations=2, init_centroids=cold.centroids, backend="torch")
    straight = batched_kmeans(x, 8, iterations=4, seed=3, backend="torch")
    # Warm start resumes exactly where the cold run stopped: 2 + 2 iterations == 4 iterations.
    assert torch.equal(warm.labels, straight.labels)
    torch.testing.assert_close(warm.centroids, straight.centroids)
    before = kmeans_inertia(x, cold.labels, cold.centroids)
    after = kmeans_inertia(x, warm.labels, warm.centroids)
    assert torch.all(after <= before * (1 + 1e-6)) and torch.any(after < before * 0.999)
    # And on the next denoising step's slightly moved tokens, the warm start beats a fresh 2-iteration run.
    moved = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    warm_next = batched_kmeans(moved, 8, iterations=2, init_centroids=straight.centroids, backend="torch")
    fresh_next = batched_kmeans(moved, 8, iterations=2, seed=3, backend="torch")
    assert kmeans_inertia(moved, warm_next.labels, warm_next.centroids).sum() < \
        kmeans_inertia(moved, fresh_next.labels, fresh_next.centroids).sum()


def test_empty_cluster_keeps_previous_centroid():
    x = _blobs(1, 1, 80, 16, 3, seed=10)
    init = km._random_token_init(x, 4, seed=0)
    init[0, 0, 2] = 1e3  # far from every token: never assigned
    result = batched_kmeans(x, 4, iterations=3, init_centroids=init, backend="triton")
    assert result.sizes[0, 0, 2] == 0 and result.sizes.sum() == 80
    assert torch.equal(result.centroids[0, 0, 2], init[0, 0, 2])
    assert not (result.labels == 2).any()


def test_deterministic_under_seed():
    x = _blobs(1, 2, 150, 16, 6, seed=12, spread=1.0)
    a = batched_kmeans(x, 7, iterations=4, seed=5, backend="torch")
    b = batched_kmeans(x, 7, iterations=4, seed=5, backend="torch")
    c = batched_kmeans(x, 7, iterations=1, seed=6, backend="torch")
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert not torch.equal(km._random_token_init(x, 7, 5), km._random_token_init(x, 7, 6))
    assert c.iterations == 1
    init = km._random_token_init(x, 7, 5)
    # Initial centroids are distinct tokens of their own head.
    for h in range(2):
        matches = (init[0, h][:, None, :] == x[0, h][None, :, :].float()).all(-1)
        assert matches.any(-1).all() and len(torch.unique(matches.float().argmax(-1))) == 7


def test_stop_when_stable():
    x = _blobs(1, 2, 120, 16, 3, seed=13, spread=0.05)  # well separated: converges in a few iterations
    result = batched_kmeans(x, 3, iterations=50, seed=2, stop_when_stable=True, backend="torch")
    assert result.iterations < 50 and result.iterations % km.STABILITY_CHECK_EVERY == 0
    again = kmeans_assign_reference(x, result.centroids)
    assert torch.equal(again, result.labels)
    assert batched_kmeans(x, 3, iterations=6, seed=2, backend="torch").iterations == 6


def test_warm_call_makes_no_host_round_trip(monkeypatch):
    x = _blobs(1, 2, 64, 16, 4, seed=14)
    cold = batched_kmeans(x, 5, iterations=2, seed=0)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in the warm-started k-means")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "equal", forbidden)
    result = batched_kmeans(x, 5, iterations=2, init_centroids=cold.centroids)
    monkeypatch.undo()
    assert result.iterations == 2 and result.sizes.sum() == 2 * 64


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(1, 2, 10, 16, device=DEVICE)
    with pytest.raises(ValueError, match="batch, heads, tokens, head_dim"):
        batched_kmeans(x[0], 3, iterations=1)
    with pytest.raises(TypeError, match="dtype"):
        batched_kmeans(x.to(torch.int32), 3, iterations=1)
    with pytest.raises(ValueError, match="exceeds the 10 tokens"):
        batched_kmeans(x, 11, iterations=1)
    with pytest.raises(ValueError, match="positive int"):
        batched_kmeans(x, 0, iterations=1)
    with pytest.raises(ValueError, match="iterations"):
        batched_kmeans(x, 3, iterations=0)
    with pytest.raises(ValueError, match="num_clusters=3"):
        batched_kmeans(x, 3, iterations=1, init_centroids=torch.zeros(1, 2, 4, 16, device=DEVICE))
    with pytest.raises(ValueError, match="centroids must have shape"):
        kmeans_assign(x, torch.zeros(1, 2, 4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="backend"):
        kmeans_assign(x, torch.zeros(1, 2, 4, 16, device=DEVICE), backend="cuda")
    with pytest.raises(ValueError, match="labels must have shape"):
        kmeans_update(x, torch.zeros(1, 2, 9, dtype=torch.int32, device=DEVICE), 3,
                      torch.zeros(1, 2, 3, 16, device=DEVICE))



# Compiled in a fresh interpreter: under TRITON_INTERPRET=1 the kernels here are not compilable objects.
_HOPPER_COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib.util
spec = importlib.util.spec_from_file_location("kmeans", sys.argv[1])  # the file alone: no package imports
km = importlib.util.module_from_spec(spec)
sys.modules["kmeans"] = km
spec.loader.exec_module(km)
ints = ["stride_xb", "stride_xh", "stride_xn", "stride_xd", "H", "N", "C", "D"]
assign_sig = {"x_ptr": "*bf16", "c_ptr": "*bf16", "cnorm_ptr": "*fp32", "labels_ptr": "*i32",
              **{n: "i32" for n in ints},
              "BLOCK_N": "constexpr", "BLOCK_C": "constexpr", "BLOCK_D": "constexpr", "IEEE_DOT": "constexpr"}
segment_sig = {"x_ptr": "*bf16", "order_ptr": "*i64", "offsets_ptr": "*i32", "prev_ptr": "*fp32",
               "cent_ptr": "*fp32", "sizes_ptr": "*i32", **{n: "i32" for n in ints},
               "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
try:
    sources = [
        (ASTSource(fn=km._assign_kernel, signature=assign_sig,
                   constexprs={"BLOCK_N": 128, "BLOCK_C": 128, "BLOCK_D": 128, "IEEE_DOT": False}), 8),
        (ASTSource(fn=km._segment_mean_kernel, signature=segment_sig,
                   constexprs={"BLOCK_T": 64, "BLOCK_D": 128}), 4),
    ]
except TypeError as exc:
    print("SKIP another Triton API generation:", exc)
    sys.exit(0)
ptx = []
for source, warps in sources:
    ptx.append(triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"])
print("COMPILED", "wgmma" in ptx[0])
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_hopper():
    """Compile the kernels to sm_90 cubins without a GPU: catches errors that the interpreter lets through."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE, km.__file__], capture_output=True, text=True, env=env,
                          timeout=300)
    if "SKIP" in done.stdout or "ptxas" in done.stderr and "No such file" in done.stderr:
        pytest.skip(done.stdout + done.stderr[-500:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "COMPILED True" in done.stdout  # the distance tiles use Hopper tensor cores (wgmma)
