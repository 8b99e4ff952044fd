"""Ground-truth systems from their published equations, for checking recovered effective connectivity.

Every matrix here follows the one EC convention: ``C[target, source]`` (row = target, column = source).

* :func:`simulate_var` — linear VAR(1), ``x_{t+1} = C x_t + σ ε_t``.
* :func:`simulate_rate_network` — the nonlinear rate network of the EC literature (e.g. the NPI
  benchmark): ``dx = (−x + C tanh x) dt + σ dξ`` (Euler–Maruyama), sampled once per TR.
* :func:`series_cohort` — such series as an fMRI-only ``Cohort`` (one subject per series), so the whole
  TwinBrain pipeline (split, normalisation, training, twin) runs on them unchanged.
"""
from __future__ import annotations

import numpy as np

from twinbrain.data.types import Cohort, Recording


def sparse_signed_matrix(n: int, density: float, spectral_radius: float, seed: int) -> np.ndarray:
    """``[n, n]`` directed coupling: off-diagonal entries present with probability ``density``, signs
    random (excitation and inhibition), magnitudes N(0, 1), scaled to the given spectral radius."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((n, n)) * (rng.random((n, n)) < density)
    np.fill_diagonal(c, 0.0)
    rho = np.max(np.abs(np.linalg.eigvals(c)))
    return c * (spectral_radius / rho) if rho > 0 else c


def simulate_var(c: np.ndarray, n_steps: int, noise: float = 1.0, seed: int = 0, burn_in: int = 200) -> np.ndarray:
    """``[N, n_steps]`` of ``x_{t+1} = C x_t + noise * ε_t`` (needs spectral radius of ``C`` < 1)."""
    rng = np.random.default_rng(seed)
    n = c.shape[0]
    x = np.zeros(n)
    out = np.empty((n, n_steps))
    for t in range(burn_in + n_steps):
        x = c @ x + noise * rng.standard_normal(n)
        if t >= burn_in:
            out[:, t - burn_in] = x
    return out


def simulate_rate_network(c: np.ndarray, n_steps: int, dt: float = 0.05, steps_per_sample: int = 10,
                          sigma: float = 0.5, seed: int = 0, burn_in: int = 200) -> np.ndarray:
    """``[N, n_steps]`` samples (every ``steps_per_sample`` Euler steps of ``dt``) of
    ``dx = (−x + C tanh x) dt + σ dξ``."""
    rng = np.random.default_rng(seed)
    n = c.shape[0]
    x = np.zeros(n)
    out = np.empty((n, n_steps))
    sq = sigma * np.sqrt(dt)
    for t in range(burn_in + n_steps):
        noise = rng.standard_normal((steps_per_sample, n)) * sq
        for k in range(steps_per_sample):
            x = x + (-x + c @ np.tanh(x)) * dt + noise[k]
        if t >= burn_in:
            out[:, t - burn_in] = x
    return out


def series_cohort(series: list[np.ndarray], tr: float = 1.0) -> Cohort:
    """fMRI-only cohort: subject ``sXX`` per ``[N, T]`` series (no EEG channels)."""
    recs = []
    for i, x in enumerate(series):
        n, t = x.shape
        recs.append(Recording(
            subject=f"s{i:02d}", session="1", task="rest", run="1", eeg=np.zeros((0, t), np.float32),
            eeg_sfreq=1.0 / tr, fmri=np.asarray(x, np.float32), tr=tr, channel_names=[],
            region_names=[f"R{j}" for j in range(n)], channel_pos=np.zeros((0, 3), np.float32),
            region_pos=np.zeros((n, 3), np.float32), region_mask=np.ones(n, bool)))
    return Cohort(recs)


def offdiag_pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of the off-diagonal entries of two ``[N, N]`` matrices (NaN entries dropped)."""
    mask = ~np.eye(a.shape[0], dtype=bool) & np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[mask], b[mask])[0, 1])
