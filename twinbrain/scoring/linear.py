"""Ridge VAR models in closed form: the plain ridge VAR (one penalty), the structured one (own lags,
other nodes' lags and, with a prior, prior-weighted sources penalised apart and the couplings shrunk towards
the prior's shape) and their selection on validation — the ``var`` / ``svar`` baselines and the twin's
linear core at step 0."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse

from .series import finite_series, one_step_errors, one_step_mse, var_design

DEFAULT_ORDERS = (1, 2, 3, 4, 5)
DEFAULT_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
# Sources per target whose penalty a prior lowers: each target then solves a p·(K + 1) system, so the cost
# stays linear in the number of nodes; the remaining sources (the weakest prior) keep the cross penalty.
PRIOR_SOURCES = 16
# The prior's scale is fitted on validation within [0, MAX_PRIOR_SCALE]: 1 = a total lag-1 input of 1 per target.
MAX_PRIOR_SCALE = 1.0


@dataclass(frozen=True)
class RidgeVAR:
    """A fitted ridge VAR(p): ``x(t) = intercept + Σ_k coef[k] @ x(t - 1 - k)``.

    ``coef [p, N, N]`` with ``coef[k, i, j]`` = effect of source node j at lag k + 1 on target node i
    (row = target, column = source, the project's EC convention); ``intercept [N]``; ``order`` = p;
    ``alpha`` = the ridge penalty it was fitted with on a node's own lags, ``alpha_cross`` the one on other
    nodes' lags (None = ``alpha``: plain ridge), ``alpha_prior`` (None = no prior) the penalty of a source of
    prior weight 1 (a source of weight w gets ``alpha_cross^(1-w) · alpha_prior^w``, :func:`prior_support`);
    ``prior_scale`` β the lag-1 mean ``β · prior_mean(prior)`` the penalties shrink the couplings towards
    (0: towards zero). Units are those of the series (z-units in TwinBrain).
    """

    coef: np.ndarray
    intercept: np.ndarray
    order: int
    alpha: float
    alpha_cross: float | None = None
    alpha_prior: float | None = None
    prior_scale: float = 0.0

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
                z, y = var_design(s, p)
                sz += z.sum(0)
                sy += y.sum(0)
                szz += z.T @ z
                szy += z.T @ y
            self.zbar, self.ybar = sz / m, sy / m
            self.gram = szz - m * np.outer(self.zbar, self.zbar)
            self.rhs = szy - m * np.outer(self.zbar, self.ybar)
        else:
            zs, ys = zip(*(var_design(s, p) for s in series))
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
        return self.model(w, alpha=float(alpha))

    def model(self, w: np.ndarray, **fields) -> RidgeVAR:
        """The :class:`RidgeVAR` of lag-major design weights ``w [p·N, N]``, its intercept from these
        moments' training means; ``fields`` = its penalties."""
        p, n = self.p, self.n
        return RidgeVAR(coef=w.reshape(p, n, n).transpose(0, 2, 1).copy(), intercept=self.ybar - w.T @ self.zbar,
                        order=p, **fields)

    def shifted(self, mean_weights: np.ndarray) -> "_VarMoments":
        """The moments of the ridge problem for ``V = W - mean_weights`` (``[p·N, N]`` lag-major): a ridge fit
        of these plus ``mean_weights`` shrinks ``W`` towards ``mean_weights`` instead of zero (primal only)."""
        out = copy.copy(self)
        out.rhs = self.rhs - self.gram @ mean_weights
        return out


def prior_mean(prior) -> np.ndarray | None:
    """The shape ``[N, N]`` (row = target, column = source) of the lag-1 couplings a prior suggests:
    ``prior²`` off the diagonal (|r|² is the variance two nodes share), scaled so that a target's sources sum
    to 1 on average; the scale β that multiplies it is chosen on validation. None if the prior is all zero."""
    m = np.nan_to_num(np.asarray(prior, np.float64)) ** 2
    np.fill_diagonal(m, 0.0)
    total = m.sum(1).mean() if m.size else 0.0
    return m / total if total > 0 else None


def _mean_weights(mean: np.ndarray, p: int) -> np.ndarray:
    """``[p·N, N]`` lag-major design weights of a lag-1 coefficient mean ``[N, N]`` (other lags 0)."""
    n = mean.shape[0]
    w = np.zeros((p * n, n))
    w[:n] = mean.T
    return w


def _plus_mean(fit: RidgeVAR, mean_weights: np.ndarray, mom: _VarMoments, scale: float) -> RidgeVAR:
    """``fit`` (solved on :meth:`_VarMoments.shifted` by ``scale · mean_weights``) with the mean added back."""
    return mom.model(fit.weights + scale * mean_weights, alpha=fit.alpha, alpha_cross=fit.alpha_cross,
                     alpha_prior=fit.alpha_prior, prior_scale=float(scale))


def _blend(at_zero: RidgeVAR, at_one: RidgeVAR, scale: float) -> RidgeVAR:
    """The fit at prior scale β from those at 0 and 1: the ridge solution is affine in β."""
    return RidgeVAR(coef=at_zero.coef + scale * (at_one.coef - at_zero.coef),
                    intercept=at_zero.intercept + scale * (at_one.intercept - at_zero.intercept),
                    order=at_zero.order, alpha=at_zero.alpha, alpha_cross=at_zero.alpha_cross,
                    alpha_prior=at_zero.alpha_prior, prior_scale=float(scale))


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
    return _VarMoments(finite_series(train_series, order + 1, "training"), int(order), solver).solve(alpha)


def _cross_inverse(mom: _VarMoments, alpha_cross: float) -> tuple[np.ndarray, np.ndarray]:
    """``A⁻¹`` with ``A = G + alpha_cross I`` (symmetrised) and the plain ridge solution ``A⁻¹ Zᵀy [D, N]``."""
    a = mom.gram.copy()
    a[np.diag_indices_from(a)] += alpha_cross
    a_inv = scipy.linalg.inv(a, check_finite=False)
    a_inv = (a_inv + a_inv.T) / 2
    return a_inv, a_inv @ mom.rhs


def prior_support(prior, k: int = PRIOR_SOURCES) -> tuple[np.ndarray, np.ndarray] | None:
    """The sources a prior ``[N, N]`` (row = target, column = source; e.g. |FC| or structural connectivity)
    favours: per target the ``k`` sources of largest ``|prior|`` (own node excluded) ``[N, K]`` and their
    weight ``[N, K]`` in [0, 1] (``|prior|`` over its off-diagonal maximum). None if the prior is all zero."""
    w = np.abs(np.nan_to_num(np.asarray(prior, np.float64)))
    n = w.shape[0]
    if w.shape != (n, n):
        raise ValueError(f"prior must be a square [N, N] matrix, got {w.shape}")
    np.fill_diagonal(w, 0.0)
    top = w.max() if n > 1 else 0.0
    if top <= 0:
        return None
    w /= top
    order = np.where(np.eye(n, dtype=bool), -1.0, w)         # the own node ranks last, never chosen
    src = np.argsort(-order, axis=1, kind="stable")[:, :min(int(k), n - 1)]
    return src, np.take_along_axis(w, src, 1)


def _structured_solutions(mom: _VarMoments, alpha_cross: float, pairs, support=None) -> list[RidgeVAR]:
    """Ridge VAR fits with penalty ``alpha_self`` on a target's own lags, ``alpha_cross^(1-w) ·
    alpha_prior^w`` on the lags of each of its prior sources (weight w, :func:`prior_support`; none without
    ``support``) and ``alpha_cross`` on every other node's lags; one fit per ``(alpha_self, alpha_prior)``
    in ``pairs`` (``alpha_prior`` None without ``support``), all from one inverse per ``alpha_cross``.

    The penalty of target i is ``A + U_i Δ_i U_iᵀ`` (``A = G + alpha_cross I``; ``U_i`` selects its F =
    p·(K + 1) own and prior-source lag features, ``Δ_i`` their penalty minus ``alpha_cross``, ≤ 0), so
    Woodbury gives ``w_i = x_i - A⁻¹ U_i (I + Δ_i U_iᵀ A⁻¹ U_i)⁻¹ Δ_i U_iᵀ x_i`` (``x = A⁻¹ Zᵀy``): an F x F
    solve per target and candidate.
    """
    p, n = mom.p, mom.n
    a_inv, x = _cross_inverse(mom, alpha_cross)
    src, weight = support if support is not None else (np.zeros((n, 0), np.int64), np.zeros((n, 0)))
    nodes = np.concatenate([np.arange(n)[:, None], src], 1)                    # [N, K + 1]: own node first
    feats = (np.arange(p)[None, :, None] * n + nodes[:, None, :]).reshape(n, -1)   # [N, F] lag-major
    block = a_inv[feats[:, :, None], feats[:, None, :]]                        # [N, F, F]
    x_sel = x[feats, np.arange(n)[:, None]]                                    # [N, F]
    eye = np.eye(feats.shape[1])
    out = []
    for alpha_self, alpha_prior in pairs:
        pen = np.full((n, 1), alpha_self)
        if src.shape[1]:
            pen = np.concatenate([pen, alpha_cross ** (1 - weight) * alpha_prior ** weight], 1)
        delta = np.tile(pen - alpha_cross, (1, p))                             # [N, F], same order as feats
        y = np.linalg.solve(eye + delta[:, :, None] * block, (delta * x_sel)[..., None])[..., 0]
        # Σ_f A⁻¹[:, feats_i[f]] y_i[f] for every target i, as a sparse [N, D] (N·F entries) times A⁻¹.
        scatter = scipy.sparse.csr_matrix((y.ravel(), (np.repeat(np.arange(n), feats.shape[1]), feats.ravel())),
                                          shape=(n, x.shape[0]))
        w = x - (scatter @ a_inv).T
        out.append(mom.model(w, alpha=float(alpha_self), alpha_cross=float(alpha_cross),
                             alpha_prior=None if alpha_prior is None else float(alpha_prior)))
    return out


def fit_linear_model(train_series, order: int, alpha: float, alpha_cross: float,
                     alpha_prior: float | None = None, prior=None, prior_scale: float = 0.0) -> RidgeVAR:
    """Ridge VAR(``order``) with penalty ``alpha`` on each node's own lags and ``alpha_cross`` (>= alpha) on
    other nodes' lags (equal: :func:`fit_ridge_var`'s plain ridge); with ``prior`` ``[N, N]`` and
    ``alpha_prior`` (alpha <= alpha_prior < alpha_cross) the prior's sources are penalised as in
    :func:`select_linear_model`, and with ``prior_scale`` β > 0 the lag-1 couplings are shrunk towards
    ``β · prior_mean(prior)`` instead of zero."""
    if alpha_cross < alpha:
        raise ValueError(f"fit_linear_model needs alpha_cross >= alpha, got {alpha_cross} < {alpha}")
    mom = _VarMoments(finite_series(train_series, order + 1, "training"), int(order), "primal")
    mean = None
    if prior_scale:
        mean = None if prior is None else prior_mean(prior)
        if mean is None or prior_scale < 0:
            raise ValueError(f"fit_linear_model: prior_scale {prior_scale} needs a non-zero prior and a scale >= 0")
        mean = _mean_weights(mean, mom.p)
        mom_fit = mom.shifted(prior_scale * mean)
    else:
        mom_fit = mom
    if alpha_prior is not None:
        support = None if prior is None else prior_support(prior)
        if support is None or not alpha <= alpha_prior < alpha_cross:
            raise ValueError(f"fit_linear_model: alpha_prior {alpha_prior} needs a non-zero prior and "
                             f"alpha <= alpha_prior < alpha_cross ({alpha}, {alpha_cross})")
        fit = _structured_solutions(mom_fit, alpha_cross, [(alpha, alpha_prior)], support)[0]
    else:
        fit = (mom_fit.solve(alpha) if alpha_cross == alpha
               else _structured_solutions(mom_fit, alpha_cross, [(alpha, None)])[0])
    return fit if mean is None else _plus_mean(fit, mean, mom, prior_scale)


def _candidates(mom: _VarMoments, alphas: list[float], support) -> list[RidgeVAR]:
    """Every penalty candidate of one order: for each ``alpha_cross`` the plain ridge, each smaller own-lag
    penalty and, with ``support``, each prior-source penalty between them."""
    fits = []
    for i, a_cross in enumerate(alphas):
        fits += [mom.solve(a_cross)] + _structured_solutions(mom, a_cross, [(a_s, None) for a_s in alphas[:i]])
        if support is not None:
            pairs = [(a_s, a_p) for j, a_s in enumerate(alphas[:i]) for a_p in alphas[j:i]]
            fits += _structured_solutions(mom, a_cross, pairs, support)
    return fits


def select_linear_model(train_series, val_series, orders=DEFAULT_ORDERS, alphas=DEFAULT_ALPHAS, prior=None
                        ) -> tuple[RidgeVAR, dict]:
    """The strongest closed-form linear model on validation: ridge VAR with its own-lag penalty
    ``alpha`` and cross-node penalty ``alpha_cross >= alpha`` both from ``alphas`` (equal = plain ridge
    VAR; the largest ``alpha_cross`` approaches per-node AR), order from ``orders``, fitted on
    ``train_series`` only and scored by one-step MSE on the same validation targets (``t >= max(orders)``).

    With ``prior`` ``[N, N]`` (row = target, column = source: |FC| of the training spans or structural
    connectivity) the candidates also include, for every ``alpha <= alpha_prior < alpha_cross`` from
    ``alphas``, the fit that lowers the penalty of each target's :data:`PRIOR_SOURCES` strongest prior
    sources towards ``alpha_prior`` by their weight (:func:`prior_support`, :func:`_structured_solutions`): a
    prior that weights the penalty, not a mask, and kept only where validation prefers it. Every candidate
    is then also shrunk towards the prior's lag-1 mean ``β · prior_mean(prior)`` instead of zero, with the
    scale β >= 0 of least validation error (:func:`_best_scale`; β = 0 is the candidate unchanged): with little
    data the couplings lean on the prior, with much data on the data.

    Returns ``(best, info)`` with ``info = {'order', 'alpha', 'alpha_cross', 'alpha_prior', 'prior_scale',
    'val_mse', 'n_candidates'}`` (``alpha_prior`` None and ``prior_scale`` 0: no prior in the chosen fit).
    This is the twin's linear core at step 0 and the ``svar`` baseline.
    """
    orders = sorted({int(p) for p in orders})
    alphas = sorted({float(a) for a in alphas})
    if not orders or not alphas or orders[0] < 1 or alphas[0] < 0:
        raise ValueError(f"select_linear_model needs orders >= 1 and alphas >= 0, got {orders}, {alphas}")
    p_max = orders[-1]
    train = finite_series(train_series, p_max + 1, "training")
    val = finite_series(val_series, p_max + 1, "validation")
    support = None if prior is None else prior_support(prior)
    mean = None if prior is None else prior_mean(prior)
    best, best_mse, count = None, math.inf, 0
    for p in orders:
        mom = _VarMoments(train, p, "primal")
        fits = _candidates(mom, alphas, support)
        if mean is None:
            scored = ((fit, one_step_mse(fit.step, val, p, p_max)) for fit in fits)
        else:       # the same candidates shrunk towards the prior's mean, its scale fitted on validation
            mean_w = _mean_weights(mean, p)
            at_one = (_plus_mean(f, mean_w, mom, 1.0) for f in _candidates(mom.shifted(mean_w), alphas, support))
            scored = (_best_scale(f0, f1, val, p, p_max) for f0, f1 in zip(fits, at_one))
        for fit, mse in scored:
            count += 1
            if mse < best_mse:
                best, best_mse = fit, mse
    if best is None:
        raise ValueError("select_linear_model: no candidate gave a finite validation error; check the series")
    return best, {"order": best.order, "alpha": best.alpha,
                  "alpha_cross": best.alpha if best.alpha_cross is None else best.alpha_cross,
                  "alpha_prior": best.alpha_prior, "prior_scale": best.prior_scale, "val_mse": best_mse,
                  "n_candidates": count}


def _best_scale(at_zero: RidgeVAR, at_one: RidgeVAR, val, p: int, start: int) -> tuple[RidgeVAR, float]:
    """The prior scale β in [0, :data:`MAX_PRIOR_SCALE`] of least one-step validation MSE, in closed form:
    the fit is affine in β, so the validation error ``e0 + β·d`` is too."""
    e0, n = one_step_errors(at_zero.step, val, p, start)
    d = one_step_errors(at_one.step, val, p, start)[0] - e0
    dd = float(d @ d)
    scale = float(np.clip(-float(e0 @ d) / dd, 0.0, MAX_PRIOR_SCALE)) if dd > 0 else 0.0
    fit = at_zero if scale == 0 else _blend(at_zero, at_one, scale)
    e = e0 + scale * d
    return fit, (float(e @ e) / n if n else math.nan)


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
    train = finite_series(train_series, p_max + 1, "training")
    val = finite_series(val_series, p_max + 1, "validation")
    scores: dict[tuple[int, float], float] = {}
    best, best_mse = None, math.inf
    for p in orders:
        mom = _VarMoments(train, p, solver)
        for a in alphas:
            fit = mom.solve(a)
            mse = one_step_mse(fit.step, val, p, p_max)
            scores[(p, a)] = mse
            if mse < best_mse:                      # strict: keeps the smaller order / larger alpha on ties
                best, best_mse = fit, mse
    if best is None:
        raise ValueError("select_ridge_var: no candidate gave a finite validation error; check the series")
    return best, scores


def prior_terms(info: dict) -> str:
    """What a chosen fit took from the prior, for logs and reports: '' without, else e.g. ' / prior sources
    100 / prior mean β 0.05' (the penalty of the prior's sources, the scale of the mean it shrinks to)."""
    out = "" if info.get("alpha_prior") is None else f" / prior sources {info['alpha_prior']:g}"
    return out + (f" / prior mean β {info['prior_scale']:.3g}" if info.get("prior_scale") else "")
