"""Synthetic modular, distance-dependent, directed connectome and region layout.

Regions sit inside a head-sized sphere, clustered by module.  Connection
probability and weight both fall off with distance, and the base probability
is much higher within a module than between modules, which gives the dense
within / sparse between structure of real connectomes.  ``coupling[i, j]`` is
the influence of region j on region i (rows receive, columns send).
"""
from __future__ import annotations

import numpy as np

BRAIN_RADIUS_M = 0.072     # regions stay inside this radius around the head centre
MODULE_RADIUS_M = 0.045    # module centres lie on this sphere
MODULE_SPREAD_M = 0.012    # per-axis std of regions around their module centre
P_WITHIN, P_BETWEEN = 1.5, 0.1  # connection propensity at zero distance (~75% / ~2% realised)
LENGTH_M = 0.04            # distance constant of probability and weight
WEIGHT_LOGSTD = 0.4        # log-normal spread of connection weights
# Spectral radius of the normalised connectome.  The slow activity (tanh(W eta))
# loses stability at gain 1, i.e. at sim.coupling = 1 / 1.5 = 2/3; the default
# 0.6 runs at 90% of that, where slow module-wide fluctuations give BOLD
# functional connectivity of realistic strength (within-module r ~ 0.3).
SPECTRAL_RADIUS = 1.5


def module_labels(n_regions: int, n_modules: int) -> np.ndarray:
    """Balanced contiguous module labels: ``[R]`` int64 in 0..M-1."""
    return (np.arange(n_regions) * n_modules) // n_regions


def region_layout(modules: np.ndarray, centre: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Region positions ``[R, 3]`` (m) clustered by module, and unit dipole orientations ``[R, 3]``.

    Module centres form a Fibonacci lattice on the upper part of a sphere around
    ``centre`` (the brain sits above the ears); orientations are radial with a
    random tilt, roughly like pyramidal cells in a gyral crown.
    """
    n_mod = int(modules.max()) + 1
    k = np.arange(n_mod) + 0.5
    zc = 1.0 - 1.3 * k / n_mod                      # z in (-0.3, 1): upper cap
    phi = np.pi * (3.0 - np.sqrt(5.0)) * np.arange(n_mod)
    rc = np.sqrt(1.0 - zc ** 2)
    dirs = np.stack([rc * np.cos(phi), rc * np.sin(phi), zc], axis=1)
    rel = MODULE_RADIUS_M * dirs[modules] + rng.normal(0.0, MODULE_SPREAD_M, (len(modules), 3))
    norm = np.linalg.norm(rel, axis=1, keepdims=True)
    rel *= np.minimum(1.0, BRAIN_RADIUS_M / np.maximum(norm, 1e-9))
    ori = rel / np.maximum(np.linalg.norm(rel, axis=1, keepdims=True), 1e-9)
    ori = ori + 0.3 * rng.normal(size=ori.shape)
    ori /= np.linalg.norm(ori, axis=1, keepdims=True)
    return centre + rel, ori


def group_coupling(pos: np.ndarray, modules: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Directed structural coupling ``[R, R]`` float64, zero diagonal, spectral radius ``SPECTRAL_RADIUS``.

    Multiplied by ``sim.coupling`` this is the coupling the dynamics use.
    """
    n = len(modules)
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    same = modules[:, None] == modules[None]
    decay = np.exp(-dist / LENGTH_M)
    prob = np.where(same, P_WITHIN, P_BETWEEN) * decay
    adj = rng.random((n, n)) < prob
    np.fill_diagonal(adj, False)
    # Every region receives at least one input: its nearest module partner (or nearest region).
    d_in = np.where(same, dist, np.inf)
    np.fill_diagonal(d_in, np.inf)
    d_any = dist + np.diag(np.full(n, np.inf))
    for i in np.flatnonzero(~adj.any(axis=1)):
        j = np.argmin(d_in[i]) if np.isfinite(d_in[i]).any() else np.argmin(d_any[i])
        adj[i, j] = True
    weight = decay * rng.lognormal(0.0, WEIGHT_LOGSTD, (n, n))
    c = np.where(adj, weight, 0.0)
    radius = np.max(np.abs(np.linalg.eigvals(c)))
    return c * (SPECTRAL_RADIUS / radius)


def subject_coupling(group: np.ndarray, variability: float, rng: np.random.Generator) -> np.ndarray:
    """Per-subject structural coupling ``[R, R]``: the group's edges with log-normal jitter.

    Same topology as the group; each edge weight is multiplied by
    ``exp(v * xi - v^2 / 2)`` so its mean stays the group weight.
    """
    jitter = np.exp(variability * rng.standard_normal(group.shape) - 0.5 * variability ** 2)
    return group * jitter


def choose_perturb_regions(coupling: np.ndarray, modules: np.ndarray, n: int) -> np.ndarray:
    """``[n]`` stimulated regions spread over modules: the strongest senders, module by module."""
    out_strength = coupling.sum(axis=0)                 # column sums: how much j drives others
    n_mod = int(modules.max()) + 1
    ranked = [list(np.flatnonzero(modules == m)[np.argsort(-out_strength[modules == m], kind="stable")])
              for m in range(n_mod)]
    picks: list[int] = []
    while len(picks) < n:
        for m in range(n_mod):
            if ranked[m] and len(picks) < n:
                picks.append(int(ranked[m].pop(0)))
    return np.asarray(picks, dtype=np.int64)
