"""Closed-form start of the model before step 0: the linear core becomes the tuned ridge VAR and the
coupling penalties get their priors.

The VAR order (1..``model.linear_order``) and ridge alpha (``train.warm_start_alphas``) are chosen by
one-step mean squared error on the validation split's spans — never on test subjects — so at step 0 the
twin forecasts exactly like the tuned VAR baseline and training only adds nonlinear corrections.
"""
from __future__ import annotations

import logging

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..data.graph import load_structural
from ..data.series import mean_abs_correlation, span_series
from ..eval.baselines import VARBaseline
from ..schema import relation_key

log = logging.getLogger(__name__)


def one_step_mse(var: VARBaseline, series: list[np.ndarray]) -> float:
    """Mean squared one-step error of a fitted VAR over every step of every series with a full past."""
    p, err, count = var.order, 0.0, 0
    for s in series:
        if s.shape[1] <= p:
            continue
        lags = sliding_window_view(s, p + 1, axis=1)                  # [N, T - p, p + 1]
        ctx = lags[..., :p].transpose(1, 0, 2)                        # [T - p, N, p] (oldest first)
        pred = var.predict(ctx, 1)[..., 0]                            # [T - p, N]
        err += float(((pred - lags[..., p].T) ** 2).sum())
        count += pred.size
    return err / count if count else float("nan")


def select_var(train: list[np.ndarray], val: list[np.ndarray], orders, alphas) -> tuple[VARBaseline, dict]:
    """Fit a ridge VAR for every (order, alpha) on ``train``; keep the lowest one-step MSE on ``val``.
    Without validation series the largest order and the middle alpha are used (reported as such)."""
    if not any(v.shape[1] > max(orders) for v in val):
        p, a = max(orders), sorted(alphas)[len(alphas) // 2]
        return VARBaseline(p, a).fit(train), {"order": p, "alpha": a, "val_mse": None, "chosen_on": "default"}
    best = None
    for p in orders:
        for a in alphas:
            var = VARBaseline(p, a).fit(train)
            mse = one_step_mse(var, val)
            if best is None or mse < best[0]:
                best = (mse, var, p, a)
    mse, var, p, a = best
    return var, {"order": p, "alpha": a, "val_mse": mse, "chosen_on": "val"}


def warm_start(model, dm, cfg) -> dict:
    """Fit the linear core of every present modality and set the coupling priors; returns what was chosen
    (``{modality: {order, alpha, val_mse, chosen_on}}``) for the log and the run record."""
    report: dict = {}
    train = {m: span_series(dm.cohort, dm.stats, dm.split.train, m) for m in dm.modalities}
    for m in dm.modalities:
        if m not in model.linear:
            continue
        val = span_series(dm.cohort, dm.stats, dm.split.val, m)
        var, info = select_var(train[m], val, range(1, cfg.model.linear_order + 1), cfg.train.warm_start_alphas)
        model.linear[m].load_var(var.coef, var.intercept)
        report[m] = info
        log.info("linear core (%s): ridge VAR(%d), alpha %g, chosen on %s (one-step MSE %s)", m, info["order"],
                 info["alpha"], info["chosen_on"], "n/a" if info["val_mse"] is None else f"{info['val_mse']:.4f}")
    prior = cfg.model.coupling_prior
    if prior != "none":
        for m in dm.modalities:
            key = relation_key((m, "fc", m))
            if prior == "structural" and m == "fmri":
                model.set_prior(key, load_structural(cfg.graph.structural, dm.n_fmri_slots))
            else:
                model.set_prior(key, mean_abs_correlation(train[m]))
    return report
