"""Closed-form start of the model before step 0: the linear core becomes the validation-tuned linear
model and the coupling penalties get their priors.

The VAR order (``eval.baseline_orders`` up to ``model.linear_order``) and the ridge penalties on a node's own lags and on other nodes'
lags (both from ``eval.baseline_alphas``, the baselines' grid; equal = plain ridge VAR, a much larger cross penalty
approaches per-node AR) are chosen by one-step mean squared error on the validation split's spans — never
on test subjects — so at step 0 the twin forecasts exactly like the ``svar`` baseline and training only
adds nonlinear corrections.
"""
from __future__ import annotations

import logging

import numpy as np

from ..data.graph import load_structural
from ..data.series import mean_abs_correlation, span_series
from ..schema import relation_key
from ..scoring.baselines import fit_ridge_var, select_linear_model

log = logging.getLogger(__name__)


def select_core(train: list[np.ndarray], val: list[np.ndarray], orders, alphas):
    """The validation-tuned linear model (the ``svar`` baseline's own selection, :func:`select_linear_model`)
    and what was chosen. Without validation series long enough: the largest order, the middle alpha, plain
    ridge (reported so)."""
    orders = sorted(orders)
    long_enough = [v for v in val if v.shape[1] > orders[-1]]
    if not long_enough:
        p, a = orders[-1], sorted(alphas)[len(alphas) // 2]
        return fit_ridge_var(train, p, a), {"order": p, "alpha": a, "alpha_cross": a, "val_mse": None,
                                            "chosen_on": "default"}
    fit, info = select_linear_model(train, long_enough, orders, alphas)
    return fit, {**{k: info[k] for k in ("order", "alpha", "alpha_cross", "val_mse")}, "chosen_on": "val"}


def warm_start(model, dm, cfg) -> dict:
    """Fit the linear core of every present modality and set the coupling priors; returns what was chosen
    (``{modality: {order, alpha, val_mse, chosen_on}}``) for the log and the run record."""
    report: dict = {}
    train = {m: span_series(dm.cohort, dm.stats, dm.split.train, m) for m in dm.modalities}
    for m in dm.modalities:
        if m not in model.linear:
            continue
        val = span_series(dm.cohort, dm.stats, dm.split.val, m)
        orders = [p for p in cfg.eval.baseline_orders if p <= cfg.model.linear_order] or [cfg.model.linear_order]
        var, info = select_core(train[m], val, orders, cfg.eval.baseline_alphas)
        model.linear[m].load_var(var.coef, var.intercept)
        report[m] = info
        log.info("linear core (%s): ridge VAR(%d), alpha own %g / cross %g, chosen on %s (one-step MSE %s)", m,
                 info["order"], info["alpha"], info["alpha_cross"], info["chosen_on"],
                 "n/a" if info["val_mse"] is None else f"{info['val_mse']:.4f}")
    prior = cfg.model.coupling_prior
    if prior != "none":
        for m in dm.modalities:
            key = relation_key((m, "fc", m))
            if prior == "structural" and m == "fmri":
                model.set_prior(key, load_structural(cfg.graph.structural, dm.n_fmri_slots))
            else:
                model.set_prior(key, mean_abs_correlation(train[m]))
    return report
