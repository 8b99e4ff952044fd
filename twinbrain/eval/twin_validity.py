"""Twin validity on a simulated cohort: what the trained twin recovers of the simulator's ground truth.

Sections (all on the evaluated held-out windows; matrices follow ``M[i, j]`` = effect of j on i):

* ``effective_connectivity``: ``EC [N_f, N_f]`` from virtual perturbation of the trained twin
  (:meth:`twinbrain.twin.Twin.effective_connectivity`: a unit input pulse on region j at the last context
  TR, the fMRI forecast change of every region averaged over horizons ``1..H`` and windows), compared with
  (a) the true directed coupling of the evaluated subjects (mean of their ``subject_coupling``): Pearson r
  over off-diagonal entries and edge-detection AUROC (true edge = coupling != 0), and (b) the true
  perturbation response: for each stimulated region p the EC column ``EC[:, p]`` against the mean Δ-BOLD
  of the evaluated subjects (``perturb_bold`` averaged over the response window), off-target regions
  only; Pearson r and the AUROC of finding the top quartile of |Δ-BOLD|. The same scores are given for two
  references: a linear twin (ridge VAR(1) fitted on the training spans, closed-form EC) and the model's
  own input fMRI graph (|FC| k-NN edges from the training subjects), plus the off-diagonal correlation of
  the twin's EC with that input graph (how much of the EC the data graph already explains).
* ``fc``: the model's FC (correlation of its one-step-ahead fMRI forecasts over the evaluated windows) vs
  the empirical FC of the same samples (upper-triangle Pearson r).
* ``embeddings``: k-means of the learned node embeddings ``node_emb['fmri'].weight [N_f, H]`` vs the true
  modules (ARI, NMI; 0 = chance, 1 = identical).
* ``modularity``: Newman Q w.r.t. the true modules of |EC| (the twin's learned directed graph), of the
  learned dynamic adjacency (if the model has one), of the input FC graph (data, for reference) and of
  the true coupling (the ceiling the data offer).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from twinbrain.eval.forecast_eval import train_series
from twinbrain.scoring.validity import (auroc, cluster_agreement, edge_auroc, fc_similarity, fit_linear_twin,
                                     linear_twin_ec, modularity, offdiag_pearson)
from twinbrain.schema import relation_key


def _f(v) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else math.nan


def true_response(truth, subjects: list[str]) -> np.ndarray:
    """``[P, R]`` mean Δ-BOLD (percent) over the response window and over ``subjects`` (all if none match)."""
    keys = [s for s in subjects if s in truth.perturb_bold] or sorted(truth.perturb_bold)
    return np.mean([np.asarray(truth.perturb_bold[s], np.float64).mean(-1) for s in keys], axis=0)


def true_coupling(truth, subjects: list[str]) -> np.ndarray:
    """``[R, R]`` mean coupling of ``subjects`` (the group coupling if none of them is known)."""
    keys = [s for s in subjects if s in truth.subject_coupling]
    if not keys:
        return np.asarray(truth.coupling, np.float64)
    return np.mean([np.asarray(truth.subject_coupling[s], np.float64) for s in keys], axis=0)


def ec_scores(ec: np.ndarray, truth, subjects: list[str]) -> dict:
    """Recovery scores of one EC matrix ``[R, R]`` against the coupling and the perturbation response."""
    ec = np.nan_to_num(np.asarray(ec, np.float64))
    coupling = true_coupling(truth, subjects)
    out = {"coupling_r": _f(offdiag_pearson(ec, coupling)), "coupling_auroc": _f(edge_auroc(ec, coupling))}
    regions = np.asarray(truth.perturb_regions, np.int64)
    if regions.size:
        resp = true_response(truth, subjects)                                # [P, R]
        cols = ec[:, regions].T                                              # [P, R]
        off = np.arange(ec.shape[0])[None, :] != regions[:, None]            # leave out the stimulated region
        a, b = cols[off], resp[off]
        out["perturb_r"] = _f(_pearson(a, b))
        out["perturb_auroc"] = _f(auroc(np.abs(a), np.abs(b) >= np.quantile(np.abs(b), 0.75)))
    else:
        out["perturb_r"] = out["perturb_auroc"] = None
    return out


def _dense(edge_index: np.ndarray, edge_weight: np.ndarray, n: int) -> np.ndarray:
    a = np.zeros((n, n))
    np.add.at(a, (edge_index[1], edge_index[0]), np.abs(edge_weight))        # row = destination
    return a


def input_fc_graph(dm) -> np.ndarray:
    """The model's input fMRI graph of ``dm`` (group scope) as a dense ``[R, R]`` |weight| matrix, row = target."""
    key, g = ("fmri", "fc", "fmri"), dm.group_graph
    return _dense(g.edge_index[key], g.edge_weight[key], dm.n_fmri_slots)


def _learned_adjacency(model, n: int) -> np.ndarray | None:
    """``[N, N]`` learned population coupling of the fMRI slots (row = target), or None without one."""
    coupling = getattr(model, "coupling", None)
    key = relation_key(("fmri", "fc", "fmri"))
    if coupling is None or key not in coupling:
        return None
    with torch.no_grad():
        return coupling[key].matrix()[:n, :n].double().cpu().numpy()


def _q(adj: np.ndarray | None, modules: np.ndarray) -> float | None:
    if adj is None:
        return None
    a = np.abs(np.nan_to_num(adj))
    np.fill_diagonal(a, 0.0)
    return _f(modularity(a, modules))


def twin_validity(model, cfg, meta: dict, dm, split: str, window_index, fc: dict, *, horizon: int,
                  path=None, ec_batch_size: int = 64) -> dict:
    """The validity section (see the module docstring) as a JSON-ready dict.

    Args:
        model: the loaded ``TwinBrain`` (eval mode). cfg, meta: the checkpoint's config and data metadata.
        dm: the set-up ``DataModule``; split: evaluated split; window_index: ``[W]`` dataset indices.
        fc: ``{'model', 'empirical': [N, N], 'present': [N] bool}`` from ``evaluate_forecasts``.
        horizon: EC averages forecast changes over steps ``1..horizon`` (TRs).
    Returns ``{'available': False, 'reason'}`` without ground truth (real data).
    """
    truth = dm.truth
    if truth is None:
        return {"available": False, "reason": "no ground truth: the cohort is not simulated"}
    modules = np.asarray(truth.modules)
    subjects = list(dm.split.subjects.get(split, []))
    res: dict = {"available": True, "subjects": subjects, "horizon": int(horizon),
                 "n_windows": int(len(window_index)), "perturb_regions": np.asarray(truth.perturb_regions).tolist()}

    a_lin = fit_linear_twin(train_series(dm, "fmri"), alpha=cfg.eval.ridge_alpha)
    refs = {"linear_twin": ec_scores(linear_twin_ec(a_lin, horizon), truth, subjects)}
    n, graph = dm.n_fmri_slots, input_fc_graph(dm)
    refs["input_fc_graph"] = ec_scores(graph, truth, subjects)
    ec = None
    try:
        from twinbrain.twin.twin import Twin
    except ImportError as exc:          # the twin package is optional for evaluation
        res["effective_connectivity"] = {"available": False, "reason": f"twinbrain.twin unavailable ({exc})",
                                         **refs}
    else:
        twin = Twin(model, cfg, meta, path=path, data=dm)
        ds = dm.dataset(split)
        ec = twin.effective_connectivity([ds[int(i)] for i in window_index], modality="fmri", amplitude=1.0,
                                         signed=True, horizon=int(horizon), batch_size=ec_batch_size)
        res["effective_connectivity"] = {"available": True, "model": ec_scores(ec, truth, subjects), **refs}
        off = ~np.eye(n, dtype=bool)
        res["effective_connectivity"]["model_vs_input_graph_r"] = _f(_pearson(np.nan_to_num(ec)[off], graph[off]))

    keep = np.asarray(fc["present"], bool)
    sub = np.ix_(keep, keep)
    res["fc"] = {"model_vs_empirical_r": _f(fc_similarity(fc["model"][sub], fc["empirical"][sub])),
                 "n_regions": int(keep.sum())}

    emb = model.node_emb["fmri"].weight.detach().double().cpu().numpy()
    res["embeddings"] = {k: _f(v) for k, v in cluster_agreement(emb, modules, seed=cfg.train.seed).items()}
    res["embeddings"]["k"] = int(len(np.unique(modules)))

    res["modularity"] = {"ec": _q(ec, modules), "learned_adjacency": _q(_learned_adjacency(model, n), modules),
                         "input_fc_graph": _q(graph, modules),
                         "true_coupling": _q(true_coupling(truth, subjects), modules)}
    return res
