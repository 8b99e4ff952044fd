"""Twin validity: AUROC, clustering agreement, modularity and the linear-twin EC pipeline check."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from twinbrain.scoring.baselines import VARBaseline
from twinbrain.scoring.validity import (adjusted_rand_index, auroc, cluster_agreement, edge_auroc,
                                     fc_similarity, fit_linear_twin, kmeans, linear_twin_ec, modularity,
                                     normalized_mutual_info, offdiag_pearson)


def test_auroc_perfect_reversed_random_and_ties():
    pos = np.r_[np.zeros(50, bool), np.ones(30, bool)]
    scores = np.r_[np.linspace(0, 1, 50), np.linspace(2, 3, 30)]
    assert auroc(scores, pos) == 1.0
    assert auroc(-scores, pos) == 0.0
    rng = np.random.default_rng(0)
    assert auroc(rng.normal(size=20000), rng.random(20000) < 0.3) == pytest.approx(0.5, abs=0.02)
    # ties count one half: brute force over all (positive, negative) pairs
    s, y = rng.integers(0, 4, size=60).astype(float), rng.random(60) < 0.4
    brute = np.mean([(a > b) + 0.5 * (a == b) for a, b in itertools.product(s[y], s[~y])])
    assert auroc(s, y) == pytest.approx(brute)
    assert np.isnan(auroc([1.0, 2.0], [True, True]))


def test_edge_auroc_offdiagonal_only():
    rng = np.random.default_rng(1)
    true = np.where(rng.random((12, 12)) < 0.2, rng.normal(size=(12, 12)), 0.0)
    est = true.copy()
    np.fill_diagonal(est, 100.0)                            # the diagonal must not count
    assert edge_auroc(est, true) == 1.0
    assert edge_auroc(rng.normal(size=(12, 12)), true) == pytest.approx(0.5, abs=0.15)
    dense = rng.normal(size=(12, 12))
    assert edge_auroc(dense, dense, top_fraction=0.1) == 1.0


def test_offdiag_pearson_and_fc_similarity():
    rng = np.random.default_rng(2)
    true = rng.normal(size=(8, 8))
    est = 2 * true + 1
    np.fill_diagonal(est, -50.0)
    assert offdiag_pearson(est, true) == pytest.approx(1.0)
    fc = np.corrcoef(rng.normal(size=(8, 100)))
    assert fc_similarity(fc, fc) == pytest.approx(1.0)
    # upper triangle only: changing the lower triangle leaves it unchanged
    other = fc.copy()
    other[np.tril_indices(8, -1)] = 0.0
    assert fc_similarity(other, fc) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="square"):
        offdiag_pearson(np.zeros((2, 3)), np.zeros((2, 3)))


def test_ari_nmi_identical_permuted_and_hand_computed():
    a = np.array([0, 0, 1, 1, 2, 2, 2])
    assert adjusted_rand_index(a, a) == 1.0 and normalized_mutual_info(a, a) == pytest.approx(1.0)
    relabel = np.array([5, 9, 7])[a]                        # same partition, other names
    assert adjusted_rand_index(a, relabel) == 1.0
    assert normalized_mutual_info(a, relabel) == pytest.approx(1.0)
    # [0,0,1,1] vs [0,0,1,2]: index 1, expected 2·1/6, max 1.5 -> (2/3)/(7/6) = 4/7
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    # MI = ln 2, H_a = ln 2, H_b = 1.5 ln 2 -> 1 / 1.25
    assert normalized_mutual_info([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(0.8)
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 5, 5000), rng.integers(0, 5, 5000)
    assert abs(adjusted_rand_index(x, y)) < 0.01


def test_kmeans_and_cluster_agreement_on_separated_blobs():
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1, 2, 3], 15)
    centers = rng.normal(scale=10.0, size=(4, 6))
    emb = centers[labels] + rng.normal(size=(60, 6))
    pred, inertia = kmeans(emb, 4, seed=0)
    assert adjusted_rand_index(labels, pred) == 1.0 and inertia > 0
    out = cluster_agreement(emb, labels)
    assert out == {"ari": 1.0, "nmi": pytest.approx(1.0)}
    noise = cluster_agreement(rng.normal(size=(60, 6)), labels)
    assert noise["ari"] < 0.3
    assert cluster_agreement(emb, labels, seed=7) == out              # deterministic given the seed


def test_modularity_two_triangles():
    # Two triangles joined by one edge: m = 7, each side has internal weight 2·3 = 6 and degree 7.
    # Q = 2 · (6/14 − (7/14)²) = 5/14.
    a = np.zeros((6, 6))
    for i, j in [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)]:
        a[i, j] = a[j, i] = 1.0
    labels = [0, 0, 0, 1, 1, 1]
    assert modularity(a, labels) == pytest.approx(5 / 14)
    assert modularity(a, np.zeros(6)) == pytest.approx(0.0)
    assert modularity(np.triu(a), labels) == pytest.approx(5 / 14)   # directed input is symmetrised
    w = 3 * a                                                         # weights scale out
    assert modularity(w, labels) == pytest.approx(5 / 14)
    with pytest.raises(ValueError, match="non-negative"):
        modularity(-a, labels)


def _sparse_stable(n, density, radius, seed):
    rng = np.random.default_rng(seed)
    weights = rng.choice([-1.0, 1.0], (n, n)) * rng.uniform(0.2, 0.5, (n, n))
    a = np.where(rng.random((n, n)) < density, weights, 0.0)
    np.fill_diagonal(a, 0.5)
    return a * radius / np.abs(np.linalg.eigvals(a)).max()


def test_linear_twin_recovers_effective_connectivity():
    """A check of the pipeline, not of the model: fit a linear twin to a linear system, recover its EC."""
    a_true = _sparse_stable(n=30, density=0.1, radius=0.9, seed=5)
    rng = np.random.default_rng(6)
    series = []
    for _ in range(4):                                                  # four "training subjects"
        x = np.zeros((30, 1700))
        e = rng.normal(size=x.shape)
        for t in range(1, x.shape[1]):
            x[:, t] = a_true @ x[:, t - 1] + e[:, t]
        series.append(x[:, 200:])
    a_hat = fit_linear_twin(series, alpha=1.0)
    ec = linear_twin_ec(a_hat)
    assert offdiag_pearson(ec, a_true) > 0.8
    assert edge_auroc(ec, a_true) > 0.9
    # The closed form equals a virtual perturbation of the fitted twin's forecasts (finite difference).
    var = VARBaseline(p=1, alpha=1.0).fit(series)
    ctx = np.stack([s[:, 100:110] for s in series])                     # [W=4, N, 10]
    base = var.predict(ctx, 3)
    pert = np.empty((30, 30))
    for j in range(30):
        bumped = ctx.copy()
        bumped[:, j, -1] += 1.0
        pert[:, j] = (var.predict(bumped, 3) - base).mean(axis=(0, 2))
    assert np.allclose(pert, linear_twin_ec(a_hat, horizon=3), atol=1e-10)
    assert np.allclose(linear_twin_ec(a_hat, 1), a_hat)
    # A VAR(p): the closed form through its companion matrix equals the perturbed iterated forecasts too.
    var3 = VARBaseline(p=3, alpha=1.0).fit(series)
    base = var3.predict(ctx, 4)
    for j in (0, 7):
        bumped = ctx.copy()
        bumped[:, j, -1] += 1.0
        np.testing.assert_allclose((var3.predict(bumped, 4) - base).mean(axis=(0, 2)),
                                   linear_twin_ec(var3.coef, horizon=4)[:, j], atol=1e-10)
    assert np.allclose(linear_twin_ec(a_hat[None], 3), linear_twin_ec(a_hat, 3))
