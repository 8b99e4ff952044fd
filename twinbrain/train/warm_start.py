"""Closed-form start of the model before step 0: the linear core becomes the tuned ridge VAR and the
coupling penalties get their priors.

The VAR order (1..``model.linear_order``) and ridge alpha (``train.warm_start_alphas``) are chosen by
one-step mean squared error on the validation split's spans — never on test subjects — so at step 0 the
twin forecasts exactly like the tuned VAR baseline and training only adds nonlinear corrections.
"""
from __future__ import annotations

import logging

import numpy as np

from ..data.graph import load_structural
from ..data.series import mean_abs_correlation, span_series
from ..schema import relation_key
from ..scoring.baselines import fit_ridge_var, select_ridge_var

log = logging.getLogger(__name__)


def select_var(train: list[np.ndarray], val: list[np.ndarray], orders, alphas):
    """The validation-tuned ridge VAR (the baseline's own selection, :func:`select_ridge_var`) and what was
    chosen. Without validation series long enough, the largest order and the middle alpha (reported so)."""
    orders = sorted(orders)
    if not any(v.shape[1] > orders[-1] for v in val):
        p, a = orders[-1], sorted(alphas)[len(alphas) // 2]
        return fit_ridge_var(train, p, a), {"order": p, "alpha": a, "val_mse": None, "chosen_on": "default"}
    var, scores = select_ridge_var(train, [v for v in val if v.shape[1] > orders[-1]], orders, alphas)
    return var, {"order": var.order, "alpha": var.alpha, "val_mse": scores[(var.order, var.alpha)],
                 "chosen_on": "val"}


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
