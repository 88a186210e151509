"""SVG2 key-cluster selection: top-p over the size-weighted centroid softmax, ranked by score, with a floor."""

import math

import pytest
import torch

from vidaccel.attention.svg2_selection import (
    centroid_scores, cluster_mass, kept_mass, min_kept_clusters, select_key_clusters,
)


def random_case(batch=2, heads=3, cq=5, ck=17, dim=16, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    qc = torch.randn(batch, heads, cq, dim, generator=g) * spread
    kc = torch.randn(batch, heads, ck, dim, generator=g)
    sizes = torch.randint(1, 40, (batch, heads, ck), generator=g, dtype=torch.int32)
    return qc, kc, sizes


def brute_force(qc, kc, sizes, top_p, min_fraction):
    """One row at a time in float64, the obvious way: walk the score ranking, stop once the mass is reached."""
    B, H, Cq, Ck = qc.shape[0], qc.shape[1], qc.shape[2], kc.shape[2]
    floor = max(1, min(Ck, math.ceil(min_fraction * Ck - 1e-9)))
    out = torch.zeros(B, H, Cq, Ck, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            scores = qc[b, h].double() @ kc[b, h].double().T / math.sqrt(qc.shape[-1])
            weights = sizes[b, h].double() * torch.exp(scores - scores.max(-1, keepdim=True).values)
            mass = weights / weights.sum(-1, keepdim=True)
            for i in range(Cq):
                ranking = sorted(range(Ck), key=lambda j: (-scores[i, j].item(), j))
                total = 0.0
                for n, j in enumerate(ranking):
                    if total >= top_p and n >= floor:
                        break
                    out[b, h, i, j] = True
                    total += mass[i, j].item()
    return out


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("min_fraction", [0.0, 0.25])
def test_selection_matches_brute_force(top_p, min_fraction):
    qc, kc, sizes = random_case(seed=int(top_p * 100))
    selected = select_key_clusters(qc, kc, sizes, top_p=top_p, min_kept_fraction=min_fraction)
    assert selected.shape == (2, 3, 5, 17) and selected.dtype == torch.bool
    assert torch.equal(selected, brute_force(qc, kc, sizes, top_p, min_fraction))


@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.9])
def test_kept_mass_reaches_top_p_and_last_cluster_is_needed(top_p):
    qc, kc, sizes = random_case(batch=2, heads=2, cq=8, ck=40, seed=3, spread=2.0)
    selected = select_key_clusters(qc, kc, sizes, top_p=top_p, min_kept_fraction=0.0)
    kept = kept_mass(qc, kc, sizes, selected)
    assert (kept >= top_p - 1e-6).all()
    scores = centroid_scores(qc, kc)
    mass = cluster_mass(scores, sizes)
    # the last kept cluster in the ranking is the lowest-scored kept one: without it the mass is below top_p
    lowest_kept = torch.where(selected, scores, torch.full_like(scores, float("inf"))).argmin(-1, keepdim=True)
    without_last = kept - mass.gather(-1, lowest_kept).squeeze(-1)
    assert (without_last < top_p).all()
    # and everything kept scores at least as high as everything dropped (rank order)
    lowest_kept_score = torch.where(selected, scores, torch.full_like(scores, float("inf"))).min(-1).values
    highest_dropped = torch.where(selected, torch.full_like(scores, -float("inf")), scores).max(-1).values
    assert (lowest_kept_score >= highest_dropped).all()
    assert selected.sum(-1).min() >= 1 and not selected.all()


def test_minimum_fraction_forces_extra_clusters():
    qc, kc, sizes = random_case(batch=1, heads=2, cq=4, ck=20, seed=5, spread=8.0)  # peaked: few clusters suffice
    free = select_key_clusters(qc, kc, sizes, top_p=0.5, min_kept_fraction=0.0)
    forced = select_key_clusters(qc, kc, sizes, top_p=0.5, min_kept_fraction=0.3)
    assert free.sum(-1).min() < 6
    assert (forced.sum(-1) >= 6).all()  # ceil(0.3 * 20)
    assert (forced | free).eq(forced).all()  # the floor only adds clusters
    assert min_kept_clusters(20, 0.0) == 1 and min_kept_clusters(20, 0.3) == 6 and min_kept_clusters(3, 1.0) == 3
    assert min_kept_clusters(10, 0.1) == 1  # 0.1 * 10 is 1 despite float rounding


def test_mass_weights_by_cluster_size_and_empty_clusters_carry_nothing():
    qc = torch.zeros(1, 1, 1, 4)
    kc = torch.zeros(1, 1, 3, 4)  # equal scores: mass is proportional to size
    sizes = torch.tensor([[[1, 3, 0]]], dtype=torch.int32)
    mass = cluster_mass(centroid_scores(qc, kc), sizes)
    torch.testing.assert_close(mass, torch.tensor([[[[0.25, 0.75, 0.0]]]]))


def test_ties_keep_lower_index_first():
    qc = torch.zeros(1, 1, 1, 4)
    kc = torch.zeros(1, 1, 4, 4)  # all scores equal, equal sizes: each cluster carries 0.25
    sizes = torch.full((1, 1, 4), 5, dtype=torch.int32)
    selected = select_key_clusters(qc, kc, sizes, top_p=0.5)
    assert selected[0, 0, 0].tolist() == [True, True, False, False]
    selected = select_key_clusters(qc, kc, sizes, top_p=0.6)
    assert selected[0, 0, 0].tolist() == [True, True, True, False]


def test_score_order_not_mass_order():
    # cluster 0 scores highest but is small; cluster 1 scores lower but is huge: ranking is by score, so cluster
    # 0 comes first even though cluster 1 alone carries more mass
    qc = torch.tensor([[[[1.0, 0.0]]]])
    kc = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]]) * math.sqrt(2)  # scores 2 and 0
    sizes = torch.tensor([[[1, 100]]], dtype=torch.int32)
    selected = select_key_clusters(qc, kc, sizes, top_p=0.05)
    assert selected[0, 0, 0].tolist() == [True, False]  # e^2 / (e^2 + 100) = 0.069 >= 0.05
    selected = select_key_clusters(qc, kc, sizes, top_p=0.5)
    assert selected[0, 0, 0].tolist() == [True, True]


def test_batch_items_and_heads_are_independent():
    qc, kc, sizes = random_case(batch=3, heads=2, cq=6, ck=25, seed=7)
    together = select_key_clusters(qc, kc, sizes, top_p=0.8, min_kept_fraction=0.1)
    for b in range(3):
        for h in range(2):
            alone = select_key_clusters(qc[b:b + 1, h:h + 1], kc[b:b + 1, h:h + 1], sizes[b:b + 1, h:h + 1],
                                        top_p=0.8, min_kept_fraction=0.1)
            assert torch.equal(together[b:b + 1, h:h + 1], alone)
    assert not torch.equal(together[0], together[1])


def test_top_p_one_keeps_everything_and_validation():
    qc, kc, sizes = random_case()
    assert select_key_clusters(qc, kc, sizes, top_p=1.0).all()
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            select_key_clusters(qc, kc, sizes, top_p=bad)
    with pytest.raises(ValueError, match="min_kept_fraction"):
        select_key_clusters(qc, kc, sizes, top_p=0.9, min_kept_fraction=1.5)
    with pytest.raises(ValueError, match="sizes"):
        select_key_clusters(qc, kc, sizes[..., :-1], top_p=0.9)
    with pytest.raises(ValueError, match="disagree"):
        select_key_clusters(qc, kc[:, :2], sizes[:, :2], top_p=0.9)


def test_half_precision_centroids_on_device_dtype():
    qc, kc, sizes = random_case()
    full = select_key_clusters(qc, kc, sizes, top_p=0.9)
    half = select_key_clusters(qc.half(), kc.half(), sizes, top_p=0.9)
    assert half.shape == full.shape
    assert (half != full).float().mean() < 0.05  # rounding of the centroids may move a borderline cluster
