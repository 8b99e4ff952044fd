"""Forecast baselines run on the same windows as the model: persistence, per-node AR(p), ridge VAR(p), MLP.

Every baseline has the same two calls:

* ``fit(series_list)``: each series is one training recording ``[N, T]`` (nodes x time steps, fMRI TRs or
  EEG samples), training subjects only. Node ``i`` must be the same atlas slot in every series.
* ``predict(ctx, horizon)``: ``ctx [W, N, T_ctx]`` (windows, nodes, context steps) -> ``[W, N, horizon]``,
  where ``out[..., h - 1]`` forecasts the step ``h`` steps after the last context step. Multi-step
  forecasts iterate the one-step model on its own predictions (no peeking at targets).

Inputs may be numpy arrays or torch tensors; predictions come back in the type (and, for tensors, the
dtype and device) of ``ctx``. Fitting runs in float64 numpy. The intercept is never penalised: features
and targets are centred by their training means before the ridge solve. ``alpha`` is added to the
summed (not averaged) squared error, so its effect fades as training data grows.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from numpy.lib.stride_tricks import sliding_window_view

from .flow import transfer_flow


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _like(out: np.ndarray, ref):
    """Return ``out`` in the container of ``ref`` (torch tensor with its device/dtype, or numpy)."""
    if isinstance(ref, torch.Tensor):
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        return torch.as_tensor(out, device=ref.device).to(dtype)
    return out


def _check_series(series_list, min_len: int) -> list[np.ndarray]:
    if isinstance(series_list, (np.ndarray, torch.Tensor)) and np.ndim(series_list) == 2:
        series_list = [series_list]
    out = [_as_numpy(s) for s in series_list]
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


def _lagged(x: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Series ``[N, T]`` -> lags ``[N, T - p, p]`` (``[..., k]``: k + 1 steps back), targets ``[N, T - p]``."""
    v = sliding_window_view(x, p + 1, axis=1)          # [N, T - p, p + 1], v[n, i, j] = x[n, i + j]
    return v[..., :p][..., ::-1], v[..., p]


def _solve_ridge(gram: np.ndarray, rhs: np.ndarray, alpha: float) -> np.ndarray:
    """Solve ``(gram + alpha I) w = rhs``, batched over leading axes; pseudo-inverse if singular."""
    d = gram.shape[-1]
    a = gram + alpha * np.eye(d)
    try:
        return np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(a) @ rhs


class Baseline:
    """Interface: ``fit(series_list) -> self``; ``predict(ctx [W, N, T_ctx], horizon) -> [W, N, horizon]``."""

    name = "baseline"
    order = 1   # context steps the one-step model reads

    def fit(self, series_list) -> "Baseline":
        return self

    def _check_ctx(self, ctx, horizon: int) -> np.ndarray:
        x = _as_numpy(ctx)
        if x.ndim != 3:
            raise ValueError(f"{self.name}: ctx must be [W, N, T_ctx] (windows, nodes, time), got {x.shape}")
        if x.shape[-1] < self.order:
            raise ValueError(f"{self.name}: needs at least {self.order} context steps, got {x.shape[-1]}")
        if int(horizon) < 1:
            raise ValueError(f"{self.name}: horizon must be >= 1, got {horizon}")
        return x

    def predict(self, ctx, horizon: int):
        raise NotImplementedError


class Persistence(Baseline):
    """The last context value repeated: ``out[w, n, h] = ctx[w, n, -1]``. Needs no fitting."""

    name = "persistence"

    def predict(self, ctx, horizon: int):
        x = self._check_ctx(ctx, horizon)
        return _like(np.repeat(x[..., -1:], int(horizon), axis=-1), ctx)


def persistence(ctx, horizon: int):
    """Functional form of :class:`Persistence`: ``[W, N, T_ctx] -> [W, N, horizon]``."""
    return Persistence().predict(ctx, horizon)


class _Iterated(Baseline):
    """A one-step model ``_step(lags [W, N, p]) -> [W, N]`` iterated over the horizon."""

    def _step(self, lags: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, ctx, horizon: int):
        x = self._check_ctx(ctx, horizon)
        if not getattr(self, "fitted", False):
            raise RuntimeError(f"{self.name}: call fit(training_series) before predict()")
        lags = x[..., -self.order:][..., ::-1].copy()         # [W, N, p], lags[..., 0] = most recent
        out = np.empty(x.shape[:2] + (int(horizon),))
        for h in range(int(horizon)):                       # few steps; nodes and windows are vectorised
            nxt = self._step(lags)
            out[..., h] = nxt
            lags = np.concatenate([nxt[..., None], lags[..., :-1]], axis=-1)
        return _like(out, ctx)


class ARBaseline(_Iterated):
    """Per-node AR(p): ``x_n(t) = c_n + Σ_k a_n[k] x_n(t - 1 - k)``, ridge least squares on all training steps.

    Each node has its own coefficients (node identity is fixed across subjects). ``p = 1`` is the fitted
    AR(1) "persistence with a coefficient". Non-finite samples (missing slots) are skipped per node.
    Cost: O(M N p²) to fit for M training steps, O(W N p H) to predict.
    Attributes after ``fit``: ``coef [N, p]`` (``coef[n, k]`` = weight of lag k + 1), ``intercept [N]``.
    """

    def __init__(self, p: int = 3, alpha: float = 1.0):
        if p < 1 or alpha < 0:
            raise ValueError(f"ARBaseline needs p >= 1 and alpha >= 0, got p={p}, alpha={alpha}")
        self.order, self.alpha, self.name = int(p), float(alpha), f"ar{p}"
        self.fitted = False

    def fit(self, series_list) -> "ARBaseline":
        p = self.order
        series = _check_series(series_list, p + 1)
        n = series[0].shape[0]
        cnt, sz, sy = np.zeros(n), np.zeros((n, p)), np.zeros(n)
        szz, szy = np.zeros((n, p, p)), np.zeros((n, p))
        for s in series:
            if s.shape[1] <= p:
                continue
            z, y = _lagged(s, p)                               # [N, M, p], [N, M]
            ok = np.isfinite(z).all(-1) & np.isfinite(y)       # [N, M]
            z, y, w = np.where(ok[..., None], z, 0.0), np.where(ok, y, 0.0), ok.astype(np.float64)
            cnt += w.sum(1)
            sz += z.sum(1)
            sy += y.sum(1)
            szz += np.einsum("nmk,nml->nkl", z, z)
            szy += np.einsum("nmk,nm->nk", z, y)
        m = np.maximum(cnt, 1.0)
        zbar, ybar = sz / m[:, None], sy / m
        gram = szz - cnt[:, None, None] * zbar[:, :, None] * zbar[:, None, :]
        rhs = szy - cnt[:, None] * zbar * ybar[:, None]
        self.coef = _solve_ridge(gram, rhs[..., None], self.alpha)[..., 0]     # [N, p]
        self.coef[cnt == 0] = 0.0                                               # never observed: predict 0
        self.intercept = ybar - np.einsum("nk,nk->n", self.coef, zbar)
        self.fitted = True
        return self

    def _step(self, lags: np.ndarray) -> np.ndarray:
        return self.intercept + np.einsum("wnk,nk->wn", lags, self.coef)


# ---------------------------------------------------------------- ridge VAR as pure functions

DEFAULT_ORDERS = (1, 2, 3, 4, 5)
DEFAULT_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


@dataclass(frozen=True)
class RidgeVAR:
    """A fitted ridge VAR(p): ``x(t) = intercept + Σ_k coef[k] @ x(t - 1 - k)``.

    ``coef [p, N, N]`` with ``coef[k, i, j]`` = effect of source node j at lag k + 1 on target node i
    (row = target, column = source, the project's EC convention); ``intercept [N]``; ``order`` = p;
    ``alpha`` = the ridge penalty it was fitted with on a node's own lags, ``alpha_cross`` the one on other
    nodes' lags (None = ``alpha``: plain ridge). Units are those of the series (z-units in TwinBrain).
    """

    coef: np.ndarray
    intercept: np.ndarray
    order: int
    alpha: float
    alpha_cross: float | None = None

    @property
    def weights(self) -> np.ndarray:
        """``[p·N, N]`` lag-major design weights: ``x(t) = intercept + z @ weights`` with
        ``z = [x(t-1); …; x(t-p)]`` flattened lag-major (``z[k·N + j] = x_j(t - 1 - k)``)."""
        p, n, _ = self.coef.shape
        return self.coef.transpose(0, 2, 1).reshape(p * n, n)

    def step(self, lags: np.ndarray) -> np.ndarray:
        """One step: ``lags [W, N, p]`` (``lags[..., k]`` = k + 1 steps back) -> ``[W, N]``."""
        w, n, p = lags.shape
        return self.intercept + lags.transpose(0, 2, 1).reshape(w, p * n) @ self.weights


def _var_design(s: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Series ``[N, T]`` -> Z ``[T - p, p·N]`` (lag-major) and Y ``[T - p, N]`` (targets at t = p..T-1)."""
    z, y = _lagged(s, p)                                    # [N, M, p], [N, M]
    return z.transpose(1, 2, 0).reshape(z.shape[1], -1), y.T


class _VarMoments:
    """Centred sufficient statistics of the ridge VAR(p) problem on some series, reusable over alphas.

    ``primal``: Gram ``Zcᵀ Zc [D, D]`` and ``Zcᵀ Yc [D, N]``; ``dual``: centred ``Zc [M, D]``, ``Yc [M, N]``
    and kernel ``Zc Zcᵀ [M, M]`` (cheaper when M < D = p·N).
    """

    def __init__(self, series: list[np.ndarray], p: int, solver: str):
        series = [s for s in series if s.shape[1] > p]
        self.p, self.n = p, series[0].shape[0]
        d, m = p * self.n, sum(s.shape[1] - p for s in series)
        self.solver = solver if solver != "auto" else ("dual" if m < d else "primal")
        if self.solver == "primal":
            sz, sy = np.zeros(d), np.zeros(self.n)
            szz, szy = np.zeros((d, d)), np.zeros((d, self.n))
            for s in series:
                z, y = _var_design(s, p)
                sz += z.sum(0)
                sy += y.sum(0)
                szz += z.T @ z
                szy += z.T @ y
            self.zbar, self.ybar = sz / m, sy / m
            self.gram = szz - m * np.outer(self.zbar, self.zbar)
            self.rhs = szy - m * np.outer(self.zbar, self.ybar)
        else:
            zs, ys = zip(*(_var_design(s, p) for s in series))
            z, y = np.concatenate(zs), np.concatenate(ys)
            self.zbar, self.ybar = z.mean(0), y.mean(0)
            self.z, self.y = z - self.zbar, y - self.ybar
            self.kernel = self.z @ self.z.T

    def solve(self, alpha: float) -> RidgeVAR:
        if self.solver == "primal":
            a = self.gram.copy()
            a[np.diag_indices_from(a)] += alpha
            try:
                w = scipy.linalg.solve(a, self.rhs, assume_a="pos")
            except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
                w = np.linalg.lstsq(a, self.rhs, rcond=None)[0]
        else:
            k = self.kernel.copy()
            k[np.diag_indices_from(k)] += alpha
            try:
                w = self.z.T @ scipy.linalg.solve(k, self.y, assume_a="pos")
            except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
                w = self.z.T @ np.linalg.lstsq(k, self.y, rcond=None)[0]
        p, n = self.p, self.n                                      # w [p·N, N], lag-major rows
        return RidgeVAR(coef=w.reshape(p, n, n).transpose(0, 2, 1).copy(),
                        intercept=self.ybar - w.T @ self.zbar, order=p, alpha=float(alpha))


def _finite_series(series_list, min_len: int, what: str) -> list[np.ndarray]:
    series = _check_series(series_list, min_len)
    for i, s in enumerate(series):
        if not np.isfinite(s).all():
            raise ValueError(f"ridge VAR: {what} series {i} has non-finite values; "
                             f"impute or zero missing slots before fitting the VAR")
    return series


def fit_ridge_var(train_series, order: int, alpha: float, solver: str = "auto") -> RidgeVAR:
    """Closed-form ridge VAR(``order``) on a list of finite ``[N, T]`` float arrays (one per recording span).

    Lags never cross series boundaries; the intercept is not penalised (features and targets are
    centred by their training means); ``alpha`` is added to the summed squared error. ``solver``:
    'primal' (D x D Gram, D = order·N), 'dual' (M x M kernel, M = training steps) or 'auto' (dual when
    M < D). Returns :class:`RidgeVAR` (``coef [p, N, N]`` row = target, column = source; ``intercept [N]``).
    """
    if order < 1 or alpha < 0 or solver not in ("auto", "primal", "dual"):
        raise ValueError(f"fit_ridge_var needs order >= 1, alpha >= 0, solver in auto|primal|dual; "
                         f"got order={order}, alpha={alpha}, solver={solver!r}")
    return _VarMoments(_finite_series(train_series, order + 1, "training"), int(order), solver).solve(alpha)


def _one_step_mse(step, series: list[np.ndarray], p: int, start: int) -> float:
    """Mean squared one-step error of ``step(lags [M, N, p]) -> [M, N]`` on targets ``t >= start`` of every
    series (``start >= p``, the same targets for every candidate order)."""
    se, cnt = 0.0, 0
    for s in series:
        if s.shape[1] <= start:
            continue
        z, y = _lagged(s, p)                                   # [N, T - p, p], targets t = p..T-1
        z, y = z[:, start - p:].transpose(1, 0, 2), y[:, start - p:].T      # [M, N, p], [M, N]
        ok = np.isfinite(y) & np.isfinite(z).all(-1)
        err = np.where(ok, step(np.where(ok[..., None], z, 0.0)) - np.where(ok, y, 0.0), 0.0)
        se += float((err ** 2).sum())
        cnt += int(ok.sum())
    return se / cnt if cnt else math.nan


def _structured_solutions(mom: _VarMoments, alpha_cross: float, alpha_selfs) -> list[RidgeVAR]:
    """Ridge VAR fits with penalty ``alpha_self`` on each target's own lags and ``alpha_cross`` on every
    other node's lags, one per ``alpha_self`` (all < ``alpha_cross``), from one inverse per ``alpha_cross``.

    Per target i the penalty is ``A + δ S_i S_iᵀ`` with ``A = G + alpha_cross I``, ``δ = alpha_self -
    alpha_cross`` and ``S_i`` the p own-lag features of i, so Woodbury gives its solution from ``A⁻¹`` and a
    p x p solve: ``w_i = x_i - A⁻¹ S_i (I/δ + S_iᵀ A⁻¹ S_i)⁻¹ S_iᵀ x_i`` with ``x_i = A⁻¹ r_i``.
    """
    p, n = mom.p, mom.n
    a = mom.gram.copy()
    a[np.diag_indices_from(a)] += alpha_cross
    a_inv = scipy.linalg.inv(a, check_finite=False)
    a_inv = (a_inv + a_inv.T) / 2
    x = a_inv @ mom.rhs                                               # [D, N]
    own = np.arange(p)[None, :] * n + np.arange(n)[:, None]           # [N, p] own-lag features per target
    cols = a_inv[:, own].transpose(1, 0, 2)                           # [N, D, p]
    block = a_inv[own[:, :, None], own[:, None, :]]                   # [N, p, p]
    x_own = x[own, np.arange(n)[:, None]]                             # [N, p]
    out = []
    for alpha_self in alpha_selfs:
        delta = alpha_self - alpha_cross
        sol = np.linalg.solve(block + np.eye(p) / delta, x_own[..., None])[..., 0]     # [N, p]
        w = x - np.einsum("ndp,np->dn", cols, sol)                                      # [D, N]
        out.append(RidgeVAR(coef=w.reshape(p, n, n).transpose(0, 2, 1).copy(),
                            intercept=mom.ybar - w.T @ mom.zbar, order=p, alpha=float(alpha_self),
                            alpha_cross=float(alpha_cross)))
    return out


def fit_linear_model(train_series, order: int, alpha: float, alpha_cross: float) -> RidgeVAR:
    """Ridge VAR(``order``) with penalty ``alpha`` on each node's own lags and ``alpha_cross`` (>= alpha) on
    other nodes' lags (equal: :func:`fit_ridge_var`'s plain ridge)."""
    if alpha_cross < alpha:
        raise ValueError(f"fit_linear_model needs alpha_cross >= alpha, got {alpha_cross} < {alpha}")
    mom = _VarMoments(_finite_series(train_series, order + 1, "training"), int(order), "primal")
    return mom.solve(alpha) if alpha_cross == alpha else _structured_solutions(mom, alpha_cross, [alpha])[0]


def select_linear_model(train_series, val_series, orders=DEFAULT_ORDERS, alphas=DEFAULT_ALPHAS
                        ) -> tuple[RidgeVAR, dict]:
    """The strongest closed-form linear model on validation: ridge VAR with its own-lag penalty
    ``alpha`` and cross-node penalty ``alpha_cross >= alpha`` both from ``alphas`` (equal = plain ridge
    VAR; the largest ``alpha_cross`` approaches per-node AR), order from ``orders``, fitted on
    ``train_series`` only and scored by one-step MSE on the same validation targets (``t >= max(orders)``).

    Returns ``(best, info)`` with ``info = {'order', 'alpha', 'alpha_cross', 'val_mse', 'n_candidates'}``.
    This is the twin's linear core at step 0 and the ``svar`` baseline.
    """
    orders = sorted({int(p) for p in orders})
    alphas = sorted({float(a) for a in alphas})
    if not orders or not alphas or orders[0] < 1 or alphas[0] < 0:
        raise ValueError(f"select_linear_model needs orders >= 1 and alphas >= 0, got {orders}, {alphas}")
    p_max = orders[-1]
    train = _finite_series(train_series, p_max + 1, "training")
    val = _finite_series(val_series, p_max + 1, "validation")
    best, best_mse, count = None, math.inf, 0
    for p in orders:
        mom = _VarMoments(train, p, "primal")
        for i, a_cross in enumerate(alphas):
            fits = [mom.solve(a_cross)] + _structured_solutions(mom, a_cross, alphas[:i])
            for fit in fits:
                mse = _one_step_mse(fit.step, val, p, p_max)
                count += 1
                if mse < best_mse:
                    best, best_mse = fit, mse
    if best is None:
        raise ValueError("select_linear_model: no candidate gave a finite validation error; check the series")
    return best, {"order": best.order, "alpha": best.alpha,
                  "alpha_cross": best.alpha if best.alpha_cross is None else best.alpha_cross,
                  "val_mse": best_mse, "n_candidates": count}


def select_ridge_var(train_series, val_series, orders=DEFAULT_ORDERS, alphas=DEFAULT_ALPHAS,
                     solver: str = "auto") -> tuple[RidgeVAR, dict[tuple[int, float], float]]:
    """Choose the ridge VAR order and alpha on validation series; fit on the training series only.

    Args:
        train_series / val_series: lists of finite ``[N, T]`` float arrays (nodes x steps), e.g. the
            normalised training and validation spans. Never pass test subjects here.
        orders / alphas: the candidate grid. Every candidate is scored on the same validation targets
            (steps ``t >= max(orders)`` of each validation series) by one-step mean squared error.
    Returns ``(best, scores)``: the :class:`RidgeVAR` with the lowest validation MSE (fitted on
    ``train_series``; ties go to the smaller order, then the larger alpha) and ``{(order, alpha): val MSE}``.
    The Gram matrix is built once per order and re-solved per alpha.
    """
    orders = sorted({int(p) for p in orders})
    alphas = sorted({float(a) for a in alphas}, reverse=True)
    if not orders or not alphas or orders[0] < 1 or alphas[-1] < 0:
        raise ValueError(f"select_ridge_var needs orders >= 1 and alphas >= 0, got {orders}, {alphas}")
    p_max = orders[-1]
    train = _finite_series(train_series, p_max + 1, "training")
    val = _finite_series(val_series, p_max + 1, "validation")
    scores: dict[tuple[int, float], float] = {}
    best, best_mse = None, math.inf
    for p in orders:
        mom = _VarMoments(train, p, solver)
        for a in alphas:
            fit = mom.solve(a)
            mse = _one_step_mse(fit.step, val, p, p_max)
            scores[(p, a)] = mse
            if mse < best_mse:                      # strict: keeps the smaller order / larger alpha on ties
                best, best_mse = fit, mse
    if best is None:
        raise ValueError("select_ridge_var: no candidate gave a finite validation error; check the series")
    return best, scores


class VARBaseline(_Iterated):
    """Ridge VAR(p) over all nodes jointly: ``x(t) = c + Σ_k A_k x(t - 1 - k)``, closed form
    (:func:`fit_ridge_var`).

    Features per step are the stacked lags ``z = [x(t-1); …; x(t-p)]`` of size D = p·N (lag-major).
    Two exact solvers of the same ridge problem (M = training steps):

    * ``primal``: accumulate the D x D Gram matrix over series and Cholesky-solve it:
      O(M·D² + D³) time, O(D²) memory (N = 1000, p = 5, M = 6000: D = 5000, 200 MB, ~10 s on 2 cores).
    * ``dual``: W = Zᵀ (Z Zᵀ + αI)⁻¹ Y with an M x M system: O(M²·D + M³) time, O(M·D) memory;
      cheaper when M < D (few short training runs, many nodes; N = 1000, p = 5, M = 2400: ~2 s).
      Needs alpha > 0 to be unique.

    ``solver='auto'`` picks the dual when M < D. Training series must be finite (impute or zero missing
    slots first). Prediction costs O(W·p·N²) per horizon step (one matmul).
    Attributes after ``fit``: ``coef [p, N, N]`` with ``coef[k, i, j]`` = effect of node j
    at lag k + 1 on node i, ``intercept [N]``, ``model`` (the :class:`RidgeVAR`).
    """

    def __init__(self, p: int = 3, alpha: float = 1.0, solver: str = "auto"):
        if p < 1 or alpha < 0 or solver not in ("auto", "primal", "dual"):
            raise ValueError(f"VARBaseline needs p >= 1, alpha >= 0, solver in auto|primal|dual; "
                             f"got p={p}, alpha={alpha}, solver={solver!r}")
        self.order, self.alpha, self.solver, self.name = int(p), float(alpha), solver, f"var{p}"
        self.fitted = False

    @classmethod
    def from_fit(cls, fit: RidgeVAR, name: str | None = None) -> "VARBaseline":
        """A fitted baseline wrapping an existing :class:`RidgeVAR` (e.g. from :func:`select_ridge_var`)."""
        b = cls(fit.order, fit.alpha)
        b._set(fit)
        if name:
            b.name = name
        return b

    def _set(self, fit: RidgeVAR) -> None:
        self.model, self.coef, self.intercept = fit, fit.coef, fit.intercept
        self._w = fit.weights
        self.fitted = True

    def fit(self, series_list) -> "VARBaseline":
        self._set(fit_ridge_var(series_list, self.order, self.alpha, self.solver))
        return self

    def _step(self, lags: np.ndarray) -> np.ndarray:
        w, n, p = lags.shape                                # one BLAS matmul: [W, p·N] @ [p·N, N]
        return self.intercept + lags.transpose(0, 2, 1).reshape(w, p * n) @ self._w


class MLPBaseline(_Iterated):
    """NPI-style MLP: the last p steps of all nodes (p·N inputs) -> the next step of all nodes (N outputs).

    A small two-hidden-layer torch MLP (seeded, CPU, Adam) predicting the change from the last step, so
    an untrained net is persistence. It cannot diverge when iterated:

    * early stopping: with ``val_series``, the one-step validation MSE is measured every ``eval_every``
      updates and the best weights are kept (``best_step``, ``val_mse``; 0 = the persistence start);
    * clipped roll-out: every predicted step is clipped to each node's training range widened by
      ``clip_margin`` of its span, so an iterated forecast stays in the range of the data.
    """

    def __init__(self, p: int = 3, hidden: int = 128, steps: int = 300, lr: float = 1e-3,
                 batch_size: int = 256, weight_decay: float = 1e-4, seed: int = 0, eval_every: int = 25,
                 clip_margin: float = 0.1):
        if p < 1 or hidden < 1 or steps < 1 or eval_every < 1 or clip_margin < 0:
            raise ValueError(f"MLPBaseline needs p, hidden, steps, eval_every >= 1 and clip_margin >= 0; "
                             f"got {p}, {hidden}, {steps}, {eval_every}, {clip_margin}")
        self.order, self.hidden, self.steps, self.lr = int(p), int(hidden), int(steps), float(lr)
        self.batch_size, self.weight_decay, self.seed = int(batch_size), float(weight_decay), int(seed)
        self.eval_every, self.clip_margin = int(eval_every), float(clip_margin)
        self.name = f"mlp{p}"
        self.fitted = False

    def _design(self, series: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        zs, ys = zip(*(_var_design(np.nan_to_num(s), self.order) for s in series if s.shape[1] > self.order))
        return (torch.as_tensor(np.concatenate(zs), dtype=torch.float32),
                torch.as_tensor(np.concatenate(ys), dtype=torch.float32))

    def fit(self, series_list, val_series=None, max_val_steps: int = 8192) -> "MLPBaseline":
        """Fit on ``series_list``; with ``val_series`` (``[N, T]`` arrays, never test subjects) keep the
        weights of the best validation step (at most ``max_val_steps`` evenly spaced targets are scored)."""
        p = self.order
        series = _check_series(series_list, p + 1)
        n = series[0].shape[0]
        lo = np.nanmin(np.concatenate(series, axis=1), axis=1)
        hi = np.nanmax(np.concatenate(series, axis=1), axis=1)
        pad = self.clip_margin * (hi - lo)
        self.clip_lo, self.clip_hi = lo - pad, hi + pad
        z, y = self._design(series)
        zv = yv = None
        if val_series is not None:
            val = [s for s in _check_series(val_series, p + 1) if s.shape[1] > p]
            zv, yv = self._design(val)
            keep = torch.as_tensor(np.unique(np.linspace(0, len(zv) - 1, min(max_val_steps, len(zv))).astype(int)))
            zv, yv = zv[keep], yv[keep]
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(p * n, self.hidden), torch.nn.GELU(),
                torch.nn.Linear(self.hidden, self.hidden), torch.nn.GELU(),
                torch.nn.Linear(self.hidden, n))
            torch.nn.init.zeros_(self.net[-1].weight)       # start exactly at persistence
            torch.nn.init.zeros_(self.net[-1].bias)

        def val_mse() -> float:
            with torch.no_grad():
                return float(torch.nn.functional.mse_loss(zv[:, :n] + self.net(zv), yv))

        self.best_step, self.val_mse = 0, val_mse() if zv is not None else math.nan
        best_state = {k: v.clone() for k, v in self.net.state_dict().items()}
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        for it in range(1, self.steps + 1):
            idx = torch.randint(0, z.shape[0], (min(self.batch_size, z.shape[0]),), generator=gen)
            loss = torch.nn.functional.mse_loss(self.net(z[idx]), y[idx] - z[idx, :n])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if zv is not None and (it % self.eval_every == 0 or it == self.steps):
                v = val_mse()
                if v < self.val_mse:
                    self.best_step, self.val_mse = it, v
                    best_state = {k: t.clone() for k, t in self.net.state_dict().items()}
        if zv is not None:
            self.net.load_state_dict(best_state)
        else:
            self.best_step = self.steps
        self.net.eval()
        self.fitted = True
        return self

    @torch.no_grad()
    def _step(self, lags: np.ndarray) -> np.ndarray:
        w, n, p = lags.shape
        z = torch.as_tensor(lags.transpose(0, 2, 1).reshape(w, p * n), dtype=torch.float32)
        return np.clip(lags[..., 0] + self.net(z).double().numpy(), self.clip_lo, self.clip_hi)


def build_baselines(ar_order: int = 3, ridge_alpha: float = 1.0, mlp: bool = False) -> dict[str, Baseline]:
    """The fixed set (unfitted): persistence, fitted AR(1), AR(p), ridge VAR(p) [, MLP(p)].

    Arguments map to ``EvalConfig.ar_order`` and ``EvalConfig.ridge_alpha``. Keys are the report names.
    ``twinbrain evaluate`` uses :func:`tuned_baselines` instead unless ``eval.tune_baselines`` is false.
    """
    out: dict[str, Baseline] = {"persistence": Persistence(), "ar1": ARBaseline(1, ridge_alpha)}
    out[f"ar{ar_order}"] = ARBaseline(ar_order, ridge_alpha)
    out[f"var{ar_order}"] = VARBaseline(ar_order, ridge_alpha)
    if mlp:
        out[f"mlp{ar_order}"] = MLPBaseline(ar_order)
    return out


def fit_baselines(baselines: dict[str, Baseline], series_list: Sequence) -> dict[str, Baseline]:
    """Fit every baseline on the same training series; returns the same dict."""
    for b in baselines.values():
        b.fit(series_list)
    return baselines


def holdout_tail(series_list, fraction: float = 0.2) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split every ``[N, T]`` series chronologically: the first ``1 - fraction`` for fitting, the last
    ``fraction`` for choosing hyper-parameters (used when a run has no validation split)."""
    fit, val = [], []
    for s in series_list:
        cut = int(round(s.shape[1] * (1 - fraction)))
        fit.append(s[:, :cut])
        val.append(s[:, cut:])
    return fit, val


def select_ar(train_series, val_series, orders=DEFAULT_ORDERS, alphas=DEFAULT_ALPHAS
              ) -> tuple[ARBaseline, dict[tuple[int, float], float]]:
    """Per-node AR with one (order, alpha) for all nodes chosen by one-step validation MSE (on the same
    targets, ``t >= max(orders)``); fitted on ``train_series`` only. Returns ``(best, scores)``."""
    orders = sorted({int(p) for p in orders})
    alphas = sorted({float(a) for a in alphas}, reverse=True)
    val = _check_series(val_series, orders[-1] + 1)
    scores, best, best_mse = {}, None, math.inf
    for p in orders:
        for a in alphas:
            b = ARBaseline(p, a).fit(train_series)
            scores[(p, a)] = mse = _one_step_mse(b._step, val, p, orders[-1])
            if mse < best_mse:
                best, best_mse = b, mse
    if best is None:
        raise ValueError("select_ar: no candidate gave a finite validation error; check the series")
    return best, scores


# ---------------------------------------------------------------- transfer (MINDy-style) models

TRANSFER_SLOPES = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def step_pairs(series: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``x(t) [N, M]`` and ``x(t+1) [N, M]`` over every ``[N, T]`` series (pairs never cross series)."""
    return np.concatenate([s[:, :-1] for s in series], 1), np.concatenate([s[:, 1:] for s in series], 1)


class TransferMap:
    """Discrete MINDy (Singh et al. 2020): ``x(t+1) = c + L x(t) + W tanh(b ⊙ x(t))``, ridge in closed form.

    ``L`` diagonal (``full_linear=False``: own linear decay, all cross-node input through the transfer) or
    full (the ``hybrid`` of ``bench/ec_transfer_core.py``). ``b [N]`` slopes, ``w [N, N]`` row = target.
    """

    def __init__(self, b: np.ndarray, full_linear: bool = False):
        self.b, self.full = np.asarray(b, float), full_linear

    def fit(self, x: np.ndarray, y: np.ndarray, alpha: float) -> "TransferMap":
        """``x, y [N, M]`` (:func:`step_pairs`); ridge ``alpha`` on every coefficient but the intercept."""
        n = x.shape[0]
        p = np.tanh(self.b[:, None] * x)
        xm, pm, ym = x.mean(1), p.mean(1), y.mean(1)
        xc, pc, yc = x - xm[:, None], p - pm[:, None], y - ym[:, None]
        if self.full:                                         # one shared design [x; tanh]
            f = np.vstack([xc, pc])
            g = f @ f.T + alpha * np.eye(2 * n)
            w = scipy.linalg.solve(g, f @ yc.T, assume_a="pos").T           # [N, 2N]
            self.lin, self.w = w[:, :n], w[:, n:]
        else:                                                 # per target: [tanh (all); own x]
            gpp, gpx, gpy = pc @ pc.T, pc @ xc.T, pc @ yc.T       # [N, N] each; [j, i]
            xx, xy = (xc * xc).sum(1), (xc * yc).sum(1)
            self.w, d = np.zeros((n, n)), np.zeros(n)
            for i in range(n):
                g = np.empty((n + 1, n + 1))
                g[:n, :n], g[:n, n], g[n, :n], g[n, n] = gpp, gpx[:, i], gpx[:, i], xx[i]
                g[np.diag_indices(n + 1)] += alpha
                sol = scipy.linalg.solve(g, np.concatenate([gpy[:, i], [xy[i]]]), assume_a="pos")
                self.w[i], d[i] = sol[:n], sol[n]
            self.lin = np.diag(d)
        self.c = ym - self.lin @ xm - self.w @ pm
        return self

    def step(self, x: np.ndarray) -> np.ndarray:
        """``x [N, M] -> x(t+1) [N, M]``."""
        return self.c[:, None] + self.lin @ x + self.w @ np.tanh(self.b[:, None] * x)


def select_transfer(train_series, val_series, full_linear: bool = False, slopes=TRANSFER_SLOPES,
                    alphas=DEFAULT_ALPHAS) -> tuple[TransferMap, dict]:
    """:class:`TransferMap` with one shared slope ``b`` and ridge ``alpha`` chosen by one-step MSE on every
    validation pair; fitted on the training pairs. Returns ``(model, {'b', 'alpha', 'val_mse'})``."""
    xt, yt = step_pairs(train_series)
    xv, yv = step_pairs(val_series)
    best = None
    for b in slopes:
        for al in alphas:
            mod = TransferMap(np.full(xt.shape[0], float(b)), full_linear).fit(xt, yt, al)
            e = float(((yv - mod.step(xv)) ** 2).mean())
            if best is None or e < best[0]:
                best = (e, float(b), float(al), mod)
    return best[3], {"b": best[1], "alpha": best[2], "val_mse": best[0]}


class TransferFlow:
    """Continuous-time MINDy: ``x(t+1)`` = the flow over one step (RK4, ``substeps`` steps of 1/substeps)
    of ``dx/dt = c - D x + W tanh(b ⊙ x)``, ``D`` diagonal; EC = ``w [N, N]`` (row = target).

    :meth:`fit` starts from a diagonal :class:`TransferMap` (``W``, ``D = 1 - L_ii``, ``c``; ``b`` is kept)
    and minimises the training one-step MSE by full-batch L-BFGS (torch float64, strong Wolfe line
    search): deterministic for given data and thread count. ``w``, ``d``, ``c``, ``b`` are numpy ``[N, N]`` /
    ``[N]`` after it; :class:`twinbrain.model.coupling.LinearCore` integrates the same flow in fp32.
    """

    def __init__(self, init: TransferMap, substeps: int = 4):
        self.substeps, self.b = int(substeps), np.asarray(init.b, float)
        self.w, self.d, self.c = init.w.copy(), 1.0 - np.diag(init.lin), init.c.copy()

    def _flow(self, x: torch.Tensor, w, d, c) -> torch.Tensor:
        """``x [M, N]`` (rows = samples) -> ``[M, N]`` one step later."""
        b = torch.as_tensor(self.b, dtype=x.dtype)
        return transfer_flow(x.T, w, d[:, None], c[:, None], b[:, None], self.substeps).T

    def fit(self, x: np.ndarray, y: np.ndarray, iters: int = 150) -> "TransferFlow":
        """``x, y [N, M]`` (:func:`step_pairs` of the training series); ``iters`` L-BFGS iterations."""
        params = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (self.w, self.d, self.c)]
        xt, yt = torch.as_tensor(x.T, dtype=torch.float64), torch.as_tensor(y.T, dtype=torch.float64)
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=int(iters), line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = ((self._flow(xt, *params) - yt) ** 2).mean()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.w, self.d, self.c = (p.detach().numpy().copy() for p in params)
        return self

    def step(self, x: np.ndarray) -> np.ndarray:
        """``x [N, M] -> x(t+1) [N, M]``."""
        with torch.no_grad():
            t = [torch.as_tensor(v, dtype=torch.float64) for v in (self.w, self.d, self.c)]
            return self._flow(torch.as_tensor(np.asarray(x, float).T), *t).numpy().T


def select_transfer_flow(train_series, val_series, alphas=DEFAULT_ALPHAS, slopes=TRANSFER_SLOPES,
                         substeps: int = 4, iters: int = 150, start: int = 1) -> tuple[TransferFlow, dict]:
    """The ``ct`` model of ``bench/ec_transfer_core.py``: slope and alpha of :func:`select_transfer` (on
    validation), then :meth:`TransferFlow.fit` on the training pairs. ``info['val_mse']`` is scored on the
    validation targets ``t >= start`` (pass ``max(orders)`` to compare with :func:`select_linear_model`).
    Returns ``(flow, {'b', 'alpha', 'val_mse', 'map_val_mse', 'fit_s'})``."""
    t0 = time.perf_counter()
    train = _finite_series(train_series, 2, "training")
    val = _finite_series(val_series, start + 1, "validation")
    init, info = select_transfer(train, val, False, slopes, alphas)
    flow = TransferFlow(init, substeps).fit(*step_pairs(train), iters)
    val_mse = _one_step_mse(lambda lags: flow.step(lags[..., 0].T).T, val, 1, start)
    return flow, {"b": info["b"], "alpha": info["alpha"], "val_mse": val_mse, "map_val_mse": info["val_mse"],
                  "fit_s": time.perf_counter() - t0}


CORES = ("var", "transfer", "auto")


def select_core_model(train_series, val_series, orders=DEFAULT_ORDERS, alphas=DEFAULT_ALPHAS, core: str = "var",
                      substeps: int = 4, iters: int = 150) -> tuple[RidgeVAR | TransferFlow, dict]:
    """The twin's linear core at step 0 and the ``svar`` baseline: ``var`` = :func:`select_linear_model`;
    ``transfer`` = :func:`select_transfer_flow`; ``auto`` = whichever of the two has the lower one-step MSE
    on the same validation targets (``t >= max(orders)``). Never pass test subjects.

    Returns ``(fit, info)``: ``info`` has ``core`` (the one kept), ``val_mse`` (its validation MSE),
    ``order``, ``alpha``, ``alpha_cross`` (of the kept model; a flow has order 1 and no cross penalty),
    and with ``core != 'var'`` also ``var_val_mse``, ``transfer_val_mse``, ``slope`` and ``transfer_fit_s``.
    """
    if core not in CORES:
        raise ValueError(f"core '{core}' is not one of {', '.join(CORES)} (model.core)")
    var, info = select_linear_model(train_series, val_series, orders, alphas)
    info = {**info, "core": "var"}
    if core == "var":
        return var, info
    flow, f = select_transfer_flow(train_series, val_series, alphas, substeps=substeps, iters=iters,
                                   start=max(int(p) for p in orders))
    info.update(var_val_mse=info["val_mse"], transfer_val_mse=f["val_mse"], slope=f["b"], transfer_fit_s=f["fit_s"])
    if core == "transfer" or f["val_mse"] < info["val_mse"]:
        info.update(core="transfer", val_mse=f["val_mse"], order=1, alpha=f["alpha"], alpha_cross=None)
        return flow, info
    return var, info


class FlowBaseline(_Iterated):
    """A fitted :class:`TransferFlow` as a baseline (order 1, iterated on its own predictions)."""

    def __init__(self, flow: TransferFlow, name: str = "svar"):
        self.flow, self.name, self.order, self.fitted = flow, name, 1, True

    def fit(self, series_list) -> "FlowBaseline":
        raise RuntimeError(f"{self.name}: a FlowBaseline wraps a fitted flow (select_core_model)")

    def _step(self, lags: np.ndarray) -> np.ndarray:
        return self.flow.step(lags[..., 0].T).T              # lags [W, N, p] -> [W, N]


def tuned_baselines(train_series, val_series=None, *, orders=DEFAULT_ORDERS, alphas=DEFAULT_ALPHAS,
                    mlp: bool = False, mlp_steps: int = 300, core: str = "var") -> tuple[dict[str, Baseline], dict]:
    """The baselines as strong as they can honestly be, every hyper-parameter chosen on validation.

    ``persistence``; ``ar1`` (per-node AR(1), alpha tuned); ``ar`` (per-node AR, order and alpha tuned);
    ``var`` (ridge VAR, order and alpha tuned: :func:`select_ridge_var`); ``svar`` (ridge VAR with separate
    own-lag and cross-node penalties, :func:`select_linear_model` — what the twin's linear core starts from;
    with ``core`` = ``transfer`` / ``auto`` (``model.core``) the same selection as the twin's,
    :func:`select_core_model`); ``mlp`` (order of the tuned VAR,
    early-stopped on validation, clipped roll-out). All are fitted on ``train_series`` only. Without
    ``val_series`` (a run with no validation split) the last 20 % of every training series is held out
    to choose, and the winners are refitted on the whole training series.
    Returns ``(baselines, tuning)``; ``tuning[name]`` = ``{'order', 'alpha', 'val_mse', ...}``.
    """
    train = _check_series(train_series, 2)
    refit = not val_series
    fit_on, val = holdout_tail(train) if refit else (train, _check_series(val_series, 2))
    ar1, s1 = select_ar(fit_on, val, orders=(1,), alphas=alphas)
    ar, s_ar = select_ar(fit_on, val, orders=orders, alphas=alphas)
    var, s_var = select_ridge_var(fit_on, val, orders=orders, alphas=alphas)
    svar, s_svar = select_core_model(fit_on, val, orders=orders, alphas=alphas, core=core)
    tuning = {"ar1": {"order": 1, "alpha": ar1.alpha, "val_mse": s1[(1, ar1.alpha)]},
              "ar": {"order": ar.order, "alpha": ar.alpha, "val_mse": s_ar[(ar.order, ar.alpha)]},
              "var": {"order": var.order, "alpha": var.alpha, "val_mse": s_var[(var.order, var.alpha)]},
              "svar": {k: s_svar[k] for k in ("order", "alpha", "alpha_cross", "val_mse", "core")}}
    if s_svar["core"] == "transfer":
        tuning["svar"].update(slope=s_svar["slope"], var_val_mse=s_svar["var_val_mse"])
    if refit:
        ar1, ar = ARBaseline(1, ar1.alpha).fit(train), ARBaseline(ar.order, ar.alpha).fit(train)
        var = fit_ridge_var(train, var.order, var.alpha)
        if s_svar["core"] == "transfer":     # the chosen slope and alpha, flow refitted on all training data
            init = TransferMap(np.full(train[0].shape[0], s_svar["slope"])).fit(*step_pairs(train), s_svar["alpha"])
            svar = TransferFlow(init, svar.substeps).fit(*step_pairs(train))
        else:
            svar = fit_linear_model(train, svar.order, s_svar["alpha"], s_svar["alpha_cross"])
    out: dict[str, Baseline] = {"persistence": Persistence()}
    ar1.name, ar.name = "ar1", "ar"
    out.update(ar1=ar1, ar=ar, var=VARBaseline.from_fit(var, "var"),
               svar=FlowBaseline(svar) if isinstance(svar, TransferFlow) else VARBaseline.from_fit(svar, "svar"))
    if mlp:
        m = MLPBaseline(var.order, steps=mlp_steps).fit(fit_on, val)
        tuning["mlp"] = {"order": m.order, "best_step": m.best_step, "max_steps": m.steps, "val_mse": m.val_mse}
        if refit and m.best_step > 0:    # the early-stopping point chosen on the held-out tail, all data
            m = MLPBaseline(var.order, steps=m.best_step).fit(train)
            m.best_step = tuning["mlp"]["best_step"]
        m.name = "mlp"
        out["mlp"] = m
    for k, v in tuning.items():
        v["chosen_on"] = "last 20% of each training span" if refit else "validation split"
    return out, tuning
