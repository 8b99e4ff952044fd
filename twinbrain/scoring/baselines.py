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
from collections.abc import Sequence

import numpy as np
import torch

from .linear import (DEFAULT_ALPHAS, DEFAULT_ORDERS, RidgeVAR, fit_linear_model, fit_ridge_var, select_ridge_var)
from .series import as_numpy, check_series, lagged, one_step_mse, step_pairs, var_design
from .transfer import TransferFlow, TransferMap, select_core_model


def _like(out: np.ndarray, ref):
    """Return ``out`` in the container of ``ref`` (torch tensor with its device/dtype, or numpy)."""
    if isinstance(ref, torch.Tensor):
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        return torch.as_tensor(out, device=ref.device).to(dtype)
    return out


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
        x = as_numpy(ctx)
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
        series = check_series(series_list, p + 1)
        n = series[0].shape[0]
        cnt, sz, sy = np.zeros(n), np.zeros((n, p)), np.zeros(n)
        szz, szy = np.zeros((n, p, p)), np.zeros((n, p))
        for s in series:
            if s.shape[1] <= p:
                continue
            z, y = lagged(s, p)                               # [N, M, p], [N, M]
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
        zs, ys = zip(*(var_design(np.nan_to_num(s), self.order) for s in series if s.shape[1] > self.order))
        return (torch.as_tensor(np.concatenate(zs), dtype=torch.float32),
                torch.as_tensor(np.concatenate(ys), dtype=torch.float32))

    def fit(self, series_list, val_series=None, max_val_steps: int = 8192) -> "MLPBaseline":
        """Fit on ``series_list``; with ``val_series`` (``[N, T]`` arrays, never test subjects) keep the
        weights of the best validation step (at most ``max_val_steps`` evenly spaced targets are scored)."""
        p = self.order
        series = check_series(series_list, p + 1)
        n = series[0].shape[0]
        lo = np.nanmin(np.concatenate(series, axis=1), axis=1)
        hi = np.nanmax(np.concatenate(series, axis=1), axis=1)
        pad = self.clip_margin * (hi - lo)
        self.clip_lo, self.clip_hi = lo - pad, hi + pad
        z, y = self._design(series)
        zv = yv = None
        if val_series is not None:
            val = [s for s in check_series(val_series, p + 1) if s.shape[1] > p]
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
    val = check_series(val_series, orders[-1] + 1)
    scores, best, best_mse = {}, None, math.inf
    for p in orders:
        for a in alphas:
            b = ARBaseline(p, a).fit(train_series)
            scores[(p, a)] = mse = one_step_mse(b._step, val, p, orders[-1])
            if mse < best_mse:
                best, best_mse = b, mse
    if best is None:
        raise ValueError("select_ar: no candidate gave a finite validation error; check the series")
    return best, scores


class FlowBaseline(_Iterated):
    """A fitted :class:`TransferFlow` as a baseline (order 1, iterated on its own predictions)."""

    def __init__(self, flow: TransferFlow, name: str = "svar"):
        self.flow, self.name, self.order, self.fitted = flow, name, 1, True

    def fit(self, series_list) -> "FlowBaseline":
        raise RuntimeError(f"{self.name}: a FlowBaseline wraps a fitted flow (select_core_model)")

    def _step(self, lags: np.ndarray) -> np.ndarray:
        return self.flow.step(lags[..., 0].T).T              # lags [W, N, p] -> [W, N]


def tuned_baselines(train_series, val_series=None, *, orders=DEFAULT_ORDERS, alphas=DEFAULT_ALPHAS,
                    mlp: bool = False, mlp_steps: int = 300, core: str = "var", prior=None) -> tuple[dict[str, Baseline], dict]:
    """The baselines as strong as they can honestly be, every hyper-parameter chosen on validation.

    ``persistence``; ``ar1`` (per-node AR(1), alpha tuned); ``ar`` (per-node AR, order and alpha tuned);
    ``var`` (ridge VAR, order and alpha tuned: :func:`select_ridge_var`); ``svar`` (ridge VAR with separate
    own-lag and cross-node penalties, :func:`select_linear_model` — what the twin's linear core starts from;
    with ``core`` = ``transfer`` / ``auto`` (``model.core``) the same selection as the twin's,
    :func:`select_core_model`; with ``prior`` ``[N, N]`` also the prior-weighted candidates of the twin's
    core); ``mlp`` (order of the tuned VAR,
    early-stopped on validation, clipped roll-out). All are fitted on ``train_series`` only. Without
    ``val_series`` (a run with no validation split) the last 20 % of every training series is held out
    to choose, and the winners are refitted on the whole training series.
    Returns ``(baselines, tuning)``; ``tuning[name]`` = ``{'order', 'alpha', 'val_mse', ...}``.
    """
    train = check_series(train_series, 2)
    refit = not val_series
    fit_on, val = holdout_tail(train) if refit else (train, check_series(val_series, 2))
    ar1, s1 = select_ar(fit_on, val, orders=(1,), alphas=alphas)
    ar, s_ar = select_ar(fit_on, val, orders=orders, alphas=alphas)
    var, s_var = select_ridge_var(fit_on, val, orders=orders, alphas=alphas)
    svar, s_svar = select_core_model(fit_on, val, orders=orders, alphas=alphas, core=core, prior=prior)
    tuning = {"ar1": {"order": 1, "alpha": ar1.alpha, "val_mse": s1[(1, ar1.alpha)]},
              "ar": {"order": ar.order, "alpha": ar.alpha, "val_mse": s_ar[(ar.order, ar.alpha)]},
              "var": {"order": var.order, "alpha": var.alpha, "val_mse": s_var[(var.order, var.alpha)]},
              "svar": {k: s_svar[k] for k in ("order", "alpha", "alpha_cross", "alpha_prior", "prior_scale",
                                              "val_mse", "core")}}
    if s_svar["core"] == "transfer":
        tuning["svar"].update(slope=s_svar["slope"], var_val_mse=s_svar["var_val_mse"])
    if refit:
        ar1, ar = ARBaseline(1, ar1.alpha).fit(train), ARBaseline(ar.order, ar.alpha).fit(train)
        var = fit_ridge_var(train, var.order, var.alpha)
        if s_svar["core"] == "transfer":     # the chosen slope and alpha, flow refitted on all training data
            init = TransferMap(np.full(train[0].shape[0], s_svar["slope"])).fit(*step_pairs(train), s_svar["alpha"])
            svar = TransferFlow(init, svar.substeps).fit(*step_pairs(train))
        else:
            svar = fit_linear_model(train, svar.order, s_svar["alpha"], s_svar["alpha_cross"],
                                    s_svar["alpha_prior"], prior, s_svar["prior_scale"])
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
