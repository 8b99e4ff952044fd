"""Closed-form start of the model before step 0: the linear core becomes the validation-tuned linear
model and the coupling penalties get their priors.

The VAR order (``eval.baseline_orders`` up to ``model.linear_order``) and the ridge penalties on a node's own
lags and on other nodes' lags (both from ``eval.baseline_alphas``, the baselines' grid; equal = plain ridge VAR,
a much larger cross penalty approaches per-node AR; with ``model.coupling_prior`` also a lower penalty on each
node's strongest prior sources, |FC| of the training spans or structural connectivity) are chosen by one-step
mean squared error on the validation split's spans — never on test subjects — so at step 0 the twin forecasts
exactly like the ``svar`` baseline and training only adds nonlinear corrections. ``model.core`` = ``transfer``
fits the one-TR flow of ``dx/dt = c - D x + W tanh(b x)`` instead (slope and alpha on validation, then L-BFGS
on the training one-step MSE: :func:`select_core_model`); ``auto`` fits both and keeps the lower validation
one-step MSE. EEG's core (``model.eeg_core``) is a ridge VAR over the channels at the sample rate, chosen the
same way on the EEG spans.
"""
from __future__ import annotations

import logging

import numpy as np

from ..data.series import coupling_prior, span_series
from ..model.twinbrain import core_kind
from ..schema import relation_key
from ..scoring.linear import fit_ridge_var, prior_terms
from ..scoring.transfer import TransferFlow, select_core_model

log = logging.getLogger(__name__)


def core_orders(cfg) -> list[int]:
    """VAR orders the core is chosen from: ``eval.baseline_orders`` up to ``model.linear_order``."""
    return [p for p in cfg.eval.baseline_orders if p <= cfg.model.linear_order] or [cfg.model.linear_order]


def select_core(train: list[np.ndarray], val: list[np.ndarray], orders, alphas, core: str = "var", prior=None):
    """The validation-tuned core (the ``svar`` baseline's own selection, :func:`select_core_model`: a
    :class:`RidgeVAR` or a :class:`TransferFlow`) and what was chosen. Without validation series long
    enough: ridge VAR with the largest order and the middle alpha, whatever ``core`` (reported so). ``prior``
    ``[N, N]`` (:func:`coupling_prior`) adds the prior-weighted ridge VAR candidates."""
    orders = sorted(orders)
    long_enough = [v for v in val if v.shape[1] > orders[-1]]
    if not long_enough:
        p, a = orders[-1], sorted(alphas)[len(alphas) // 2]
        if core == "transfer":
            raise ValueError("model.core = transfer needs validation spans longer than the largest order to "
                             "choose its slope and alpha; use model.core: var or auto, or add data.val_subjects")
        return fit_ridge_var(train, p, a), {"core": "var", "order": p, "alpha": a, "alpha_cross": a,
                                            "val_mse": None, "chosen_on": "default"}
    fit, info = select_core_model(train, long_enough, orders, alphas, core=core, prior=prior)
    keep = ("core", "order", "alpha", "alpha_cross", "alpha_prior", "prior_scale", "val_mse", "var_val_mse", "transfer_val_mse",
            "slope", "transfer_fit_s")
    return fit, {**{k: info[k] for k in keep if k in info}, "chosen_on": "val"}


def warm_start(model, dm, cfg) -> dict:
    """Fit the linear core of every present modality and set the coupling priors; returns what was chosen
    (``{modality: {core, order, alpha, alpha_cross, val_mse, chosen_on}}``, with ``model.core`` transfer /
    auto also ``var_val_mse``, ``transfer_val_mse``, ``slope`` and ``transfer_fit_s`` seconds) for the log and
    the run record."""
    report: dict = {}
    train = {m: span_series(dm.cohort, dm.stats, dm.split.train, m) for m in dm.modalities}
    priors = {m: coupling_prior(cfg.model.coupling_prior, train[m], m, cfg.graph.structural) for m in dm.modalities}
    for m in dm.modalities:
        if m not in model.linear:
            continue
        val = span_series(dm.cohort, dm.stats, dm.split.val, m)
        fit, info = select_core(train[m], val, core_orders(cfg), cfg.eval.baseline_alphas, core_kind(cfg.model, m),
                                priors[m])
        mse = "n/a" if info["val_mse"] is None else f"{info['val_mse']:.4f}"
        if isinstance(fit, TransferFlow):
            model.linear[m].load_transfer(fit.w, fit.d, fit.c, fit.b)
            log.info("linear core (%s): transfer flow, slope %g, alpha %g, chosen on %s (one-step MSE %s; ridge "
                     "VAR %.4f; fit %.1f s)", m, info["slope"], info["alpha"], info["chosen_on"], mse,
                     info["var_val_mse"], info["transfer_fit_s"])
        else:
            model.linear[m].load_var(fit.coef, fit.intercept)
            log.info("linear core (%s): ridge VAR(%d), alpha own %g%s / cross %g, chosen on %s (one-step MSE %s%s)",
                     m, info["order"], info["alpha"], prior_terms(info), info["alpha_cross"], info["chosen_on"], mse,
                     "" if "transfer_val_mse" not in info else f"; transfer flow {info['transfer_val_mse']:.4f}")
        report[m] = info
    for m, prior in priors.items():
        if prior is not None:
            model.set_prior(relation_key((m, "fc", m)), prior)
    return report
