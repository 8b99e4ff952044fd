"""Checks and views of training series shared by the forecast models: ``[N, T]`` float64 arrays (nodes x
time steps), one per recording span, and the one-step validation error every model is chosen by."""
from __future__ import annotations

import math

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view


def as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def check_series(series_list, min_len: int) -> list[np.ndarray]:
    if isinstance(series_list, (np.ndarray, torch.Tensor)) and np.ndim(series_list) == 2:
        series_list = [series_list]
    out = [as_numpy(s) for s in series_list]
    if not out:
        raise ValueError("fit() got no training series; pass a list of [N, T] arrays from training subjects")
    n = out[0].shape[0]
    for i, s in enumerate(out):
        if s.ndim != 2 or s.shape[0] != n:
            raise ValueError(f"series {i} has shape {s.shape}; every series must be [N={n}, T] (nodes, time)")
    if not any(s.shape[1] >= min_len for s in out):
        raise ValueError(f"every training series is shorter than {min_len} steps (order + 1); "
                         f"lower the order or use longer recordings")
    return out


def lagged(x: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Series ``[N, T]`` -> lags ``[N, T - p, p]`` (``[..., k]``: k + 1 steps back), targets ``[N, T - p]``."""
    v = sliding_window_view(x, p + 1, axis=1)          # [N, T - p, p + 1], v[n, i, j] = x[n, i + j]
    return v[..., :p][..., ::-1], v[..., p]


def finite_series(series_list, min_len: int, what: str) -> list[np.ndarray]:
    series = check_series(series_list, min_len)
    for i, s in enumerate(series):
        if not np.isfinite(s).all():
            raise ValueError(f"{what} series {i} has non-finite values; "
                             f"impute or zero missing slots before fitting the VAR")
    return series


def one_step_errors(step, series: list[np.ndarray], p: int, start: int) -> tuple[np.ndarray, int]:
    """One-step errors of ``step(lags [M, N, p]) -> [M, N]`` on targets ``t >= start`` of every series
    (``start >= p``), flattened, 0 where the target or a lag is not finite, and the count of finite ones."""
    errs, cnt = [], 0
    for s in series:
        if s.shape[1] <= start:
            continue
        z, y = lagged(s, p)                                   # [N, T - p, p], targets t = p..T-1
        z, y = z[:, start - p:].transpose(1, 0, 2), y[:, start - p:].T      # [M, N, p], [M, N]
        ok = np.isfinite(y) & np.isfinite(z).all(-1)
        errs.append(np.where(ok, step(np.where(ok[..., None], z, 0.0)) - np.where(ok, y, 0.0), 0.0).ravel())
        cnt += int(ok.sum())
    return (np.concatenate(errs) if errs else np.zeros(0)), cnt


def one_step_mse(step, series: list[np.ndarray], p: int, start: int) -> float:
    """Mean squared one-step error of ``step(lags [M, N, p]) -> [M, N]`` on targets ``t >= start`` of every
    series (``start >= p``, the same targets for every candidate order)."""
    err, cnt = one_step_errors(step, series, p, start)
    return float(err @ err) / cnt if cnt else math.nan


def step_pairs(series: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``x(t) [N, M]`` and ``x(t+1) [N, M]`` over every ``[N, T]`` series (pairs never cross series)."""
    return np.concatenate([s[:, :-1] for s in series], 1), np.concatenate([s[:, 1:] for s in series], 1)


def var_design(s: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Series ``[N, T]`` -> Z ``[T - p, p·N]`` (lag-major) and Y ``[T - p, N]`` (targets at t = p..T-1)."""
    z, y = lagged(s, p)                                    # [N, M, p], [N, M]
    return z.transpose(1, 2, 0).reshape(z.shape[1], -1), y.T
