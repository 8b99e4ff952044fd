"""MINDy-style transfer models (Singh et al. 2020): the discrete map in closed form, the continuous-time
flow fitted by L-BFGS, and the choice between the flow and the ridge VAR as the twin's core."""
from __future__ import annotations

import time

import numpy as np
import scipy.linalg
import torch

from .flow import transfer_flow
from .linear import DEFAULT_ALPHAS, DEFAULT_ORDERS, RidgeVAR, select_linear_model
from .series import finite_series, one_step_mse, step_pairs

TRANSFER_SLOPES = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


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
    train = finite_series(train_series, 2, "training")
    val = finite_series(val_series, start + 1, "validation")
    init, info = select_transfer(train, val, False, slopes, alphas)
    flow = TransferFlow(init, substeps).fit(*step_pairs(train), iters)
    val_mse = one_step_mse(lambda lags: flow.step(lags[..., 0].T).T, val, 1, start)
    return flow, {"b": info["b"], "alpha": info["alpha"], "val_mse": val_mse, "map_val_mse": info["val_mse"],
                  "fit_s": time.perf_counter() - t0}


CORES = ("var", "transfer", "auto")


def select_core_model(train_series, val_series, orders=DEFAULT_ORDERS, alphas=DEFAULT_ALPHAS, core: str = "var",
                      substeps: int = 4, iters: int = 150, prior=None) -> tuple[RidgeVAR | TransferFlow, dict]:
    """The twin's linear core at step 0 and the ``svar`` baseline: ``var`` = :func:`select_linear_model`;
    ``transfer`` = :func:`select_transfer_flow`; ``auto`` = whichever of the two has the lower one-step MSE
    on the same validation targets (``t >= max(orders)``). Never pass test subjects.

    Returns ``(fit, info)``: ``info`` has ``core`` (the one kept), ``val_mse`` (its validation MSE),
    ``order``, ``alpha``, ``alpha_cross`` (of the kept model; a flow has order 1 and no cross penalty),
    and with ``core != 'var'`` also ``var_val_mse``, ``transfer_val_mse``, ``slope`` and ``transfer_fit_s``.
    """
    if core not in CORES:
        raise ValueError(f"core '{core}' is not one of {', '.join(CORES)} (model.core)")
    var, info = select_linear_model(train_series, val_series, orders, alphas, prior=prior)
    info = {**info, "core": "var"}
    if core == "var":
        return var, info
    flow, f = select_transfer_flow(train_series, val_series, alphas, substeps=substeps, iters=iters,
                                   start=max(int(p) for p in orders))
    info.update(var_val_mse=info["val_mse"], transfer_val_mse=f["val_mse"], slope=f["b"], transfer_fit_s=f["fit_s"])
    if core == "transfer" or f["val_mse"] < info["val_mse"]:
        info.update(core="transfer", val_mse=f["val_mse"], order=1, alpha=f["alpha"], alpha_cross=None,
                    alpha_prior=None, prior_scale=0.0)
        return flow, info
    return var, info
