"""Twin validity against ground truth (simulated cohort): connectivity recovery, FC similarity, modules.

All functions take numpy arrays (or anything ``np.asarray`` accepts) and return Python floats or numpy
arrays; nothing depends on the model. Matrix convention everywhere: ``M[i, j]`` is the influence of node
``j`` (source) on node ``i`` (target), as in ``x(t) = A x(t - 1)``.

No scikit-learn: AUROC (rank statistic), k-means (k-means++ with a fixed seed), ARI and NMI are
implemented here so the library's dependencies stay small.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from twinbrain.scoring.baselines import VARBaseline


def _square(m, name: str) -> np.ndarray:
    a = np.asarray(m, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} must be a square [N, N] matrix, got shape {a.shape}")
    return a


def _pair(est, true) -> tuple[np.ndarray, np.ndarray]:
    e, t = _square(est, "est"), _square(true, "true")
    if e.shape != t.shape:
        raise ValueError(f"est {e.shape} and true {t.shape} must have the same shape")
    return e, t


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def offdiag_pearson(est, true) -> float:
    """Pearson r between all off-diagonal entries (both triangles) of ``est [N, N]`` and ``true [N, N]``.

    Use for directed effective connectivity (asymmetric); the diagonal (self-dynamics) is excluded.
    """
    e, t = _pair(est, true)
    off = ~np.eye(e.shape[0], dtype=bool)
    return _pearson(e[off], t[off])


def auroc(scores, positives) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative).

    Mann-Whitney U from average ranks, so ties count one half. ``scores``, ``positives`` (bool): ``[K]``.
    NaN if either class is empty.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positives, dtype=bool).ravel()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)                                     # average ranks for ties
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def edge_auroc(est, true, threshold: float = 0.0, top_fraction: float | None = None) -> float:
    """AUROC of ``|est|`` for detecting the true edges, off-diagonal entries only.

    A true edge is ``|true[i, j]| > threshold``, or, with ``top_fraction`` (0, 1], the largest
    ``top_fraction`` of off-diagonal ``|true|`` (for dense ground truths such as a perturbation response).
    """
    e, t = _pair(est, true)
    off = ~np.eye(e.shape[0], dtype=bool)
    score, truth = np.abs(e[off]), np.abs(t[off])
    if top_fraction is not None:
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        k = max(1, int(round(top_fraction * truth.size)))
        positives = np.zeros(truth.size, dtype=bool)
        positives[np.argsort(-truth, kind="stable")[:k]] = True
    else:
        positives = truth > threshold
    return auroc(score, positives)


def fc_similarity(model_fc, emp_fc) -> float:
    """Pearson r between the upper triangles (diagonal excluded) of two symmetric FC matrices ``[N, N]``."""
    a, b = _square(model_fc, "model_fc"), _square(emp_fc, "emp_fc")
    if a.shape != b.shape:
        raise ValueError(f"model_fc {a.shape} and emp_fc {b.shape} must have the same shape")
    iu = np.triu_indices(a.shape[0], k=1)
    return _pearson(a[iu], b[iu])


# ---------------------------------------------------------------- clustering

def kmeans(x, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 300) -> tuple[np.ndarray, float]:
    """Lloyd's k-means, k-means++ seeding, best of ``n_init`` runs: ``x [N, D]`` -> (labels ``[N]``, inertia)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not 1 <= k <= x.shape[0]:
        raise ValueError(f"kmeans needs x [N, D] and 1 <= k <= N; got shape {x.shape}, k={k}")
    rng = np.random.default_rng(seed)
    best_labels, best_inertia = None, np.inf
    for _ in range(n_init):
        centers = [x[rng.integers(x.shape[0])]]
        for _ in range(1, k):                               # k-means++: sample far points more often
            d2 = ((x[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1).min(1)
            prob = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
            centers.append(x[rng.choice(len(x), p=prob)])
        c = np.asarray(centers)
        labels = np.full(len(x), -1)
        for _ in range(max_iter):
            d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)   # [N, k]
            new = d2.argmin(1)
            if np.array_equal(new, labels):
                break
            labels = new
            for j in range(k):
                members = x[labels == j]
                # An emptied cluster restarts at the point worst served by its centre.
                c[j] = members.mean(0) if len(members) else x[d2.min(1).argmax()]
        inertia = float(((x - c[labels]) ** 2).sum())
        if inertia < best_inertia:
            best_labels, best_inertia = labels.copy(), inertia
    return best_labels, best_inertia


def _contingency(a, b) -> np.ndarray:
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label vectors differ in length: {a.shape} vs {b.shape}")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.float64)
    np.add.at(table, (ai, bi), 1.0)
    return table


def adjusted_rand_index(labels_a, labels_b) -> float:
    """Adjusted Rand index of two partitions ``[N]`` (1 = identical up to renaming, ≈ 0 = chance)."""
    t = _contingency(labels_a, labels_b)
    comb = lambda v: (v * (v - 1) / 2).sum()                # noqa: E731  number of pairs
    index, sa, sb, total = comb(t), comb(t.sum(1)), comb(t.sum(0)), comb(np.array([t.sum()]))
    expected = sa * sb / total if total > 0 else 0.0
    maximum = (sa + sb) / 2
    if maximum == expected:                                  # both trivial (one cluster / all singletons)
        return 1.0
    return float((index - expected) / (maximum - expected))


def normalized_mutual_info(labels_a, labels_b) -> float:
    """Mutual information over the arithmetic mean of the two entropies (1 = identical partitions)."""
    t = _contingency(labels_a, labels_b)
    p = t / t.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    ha, hb = -float((pa * np.log(pa)).sum()), -float((pb * np.log(pb)).sum())
    if ha + hb == 0:                                         # both partitions have a single cluster
        return 1.0
    return max(0.0, mi / ((ha + hb) / 2))


def cluster_agreement(embeddings, labels, k: int | None = None, seed: int = 0,
                      n_init: int = 10) -> dict[str, float]:
    """Cluster learned node embeddings ``[N, D]`` with k-means and compare to true modules ``labels [N]``.

    ``k`` defaults to the number of true modules. Returns ``{'ari': ..., 'nmi': ...}``.
    """
    lab = np.asarray(labels).ravel()
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != lab.size:
        raise ValueError(f"embeddings must be [N, D] with N = len(labels) = {lab.size}; got {x.shape}")
    k = int(k) if k is not None else len(np.unique(lab))
    pred, _ = kmeans(x, k, seed=seed, n_init=n_init)
    return {"ari": adjusted_rand_index(lab, pred), "nmi": normalized_mutual_info(lab, pred)}


def modularity(adjacency, labels) -> float:
    """Newman's weighted modularity Q of the partition ``labels [N]`` on ``adjacency [N, N]`` (weights >= 0).

    Q = Σ_c [W_c / 2m − (K_c / 2m)²], with 2m = Σ_ij A_ij, W_c the weight inside community c (each
    undirected edge counted twice) and K_c its total degree. A directed graph is symmetrised first,
    (A + Aᵀ) / 2; self-loops are kept as given.
    """
    a = _square(adjacency, "adjacency")
    lab = np.asarray(labels).ravel()
    if lab.size != a.shape[0]:
        raise ValueError(f"labels has {lab.size} entries for a {a.shape[0]}-node graph")
    if (a < 0).any():
        raise ValueError("modularity needs non-negative weights; pass |A| or clip negative entries")
    a = (a + a.T) / 2
    two_m = a.sum()
    if two_m <= 0:
        return float("nan")
    deg = a.sum(1)
    q = 0.0
    for c in np.unique(lab):
        idx = lab == c
        q += a[np.ix_(idx, idx)].sum() / two_m - (deg[idx].sum() / two_m) ** 2
    return float(q)


# ---------------------------------------------------------------- linear twin (pipeline check)

def fit_linear_twin(series_list: Sequence, alpha: float = 1.0) -> np.ndarray:
    """Fit the simplest twin, a ridge VAR(1) ``x(t) = c + A x(t - 1)``, to training series ``[N, T]``.

    Returns ``A [N, N]`` (``A[i, j]`` = effect of node j on node i one step later).
    """
    return VARBaseline(p=1, alpha=alpha).fit(series_list).coef[0]


def linear_twin_ec(a, horizon: int = 1) -> np.ndarray:
    """Effective connectivity of a linear twin by virtual perturbation, in closed form.

    A unit impulse at node j on the last context step changes the VAR(1) forecast ``h`` steps later by
    ``(A^h)[:, j]``; averaged over h = 1..``horizon`` as the twin's perturbation EC averages the forecast
    change over the horizon. ``horizon = 1`` returns ``A`` itself. ``[N, N] -> [N, N]``. A VAR(p)
    ``[p, N, N]`` (``a[k]`` = lag k + 1, :class:`~twinbrain.scoring.linear.RidgeVAR.coef`) iterates its
    companion matrix: the first ``N x N`` block of its powers.
    """
    a = np.asarray(a, dtype=np.float64)
    lags = a if a.ndim == 3 else _square(a, "A")[None]
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    p, n = lags.shape[0], lags.shape[-1]
    companion = np.zeros((p * n, p * n))
    companion[:n] = np.concatenate(list(_square(m, "A[k]") for m in lags), 1)
    companion[n:, :-n] = np.eye((p - 1) * n)
    power, total = np.eye(p * n), np.zeros((n, n))
    for _ in range(horizon):
        power = companion @ power
        total += power[:n, :n]
    return total / horizon
