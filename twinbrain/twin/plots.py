"""Figures for twin answers (matplotlib, Agg backend: no display needed). Every function writes a PNG
to ``path`` and returns the path.

* :func:`plot_ec` - effective-connectivity heatmap (row = target i, column = source j), nodes grouped by
  module with boundaries drawn between modules.
* :func:`plot_response` - perturbation response (Δforecast) over time for the nodes that respond most.
* :func:`plot_brain` - brain-network layout: region positions projected to 2-D (top view: x = left-right,
  y = posterior-anterior), nodes coloured by a value, edges from the graph.
* :func:`plot_forecast` - context and forecast (± std) of a few nodes.
* :func:`plot_attribution` - attribution map ``[N, T]`` of one modality.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _limits(values: np.ndarray, signed: bool) -> tuple[str, float, float]:
    finite = values[np.isfinite(values)]
    top = float(np.abs(finite).max()) if finite.size else 1.0
    top = top or 1.0
    return ("RdBu_r", -top, top) if signed else ("viridis", 0.0, top)


def plot_ec(ec: np.ndarray, names: list[str], path, modules=None, title: str = "effective connectivity",
            hide_diagonal: bool = True) -> Path:
    """Heatmap of ``ec [N, N]`` (``ec[i, j]`` = effect of j on i). With ``modules [N]`` the nodes are
    ordered by module (stable) and module boundaries are drawn; the diagonal is blanked by default."""
    ec = np.array(ec, dtype=np.float64)
    n = ec.shape[0]
    order = np.argsort(np.asarray(modules), kind="stable") if modules is not None else np.arange(n)
    m = ec[np.ix_(order, order)]
    if hide_diagonal:
        np.fill_diagonal(m, np.nan)
    signed = bool(np.nanmin(m) < 0) if np.isfinite(m).any() else True
    cmap, lo, hi = _limits(m, signed)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="Δforecast / amplitude (z)")
    if modules is not None:
        labels = np.asarray(modules)[order]
        for b in np.nonzero(labels[1:] != labels[:-1])[0]:
            ax.axhline(b + 0.5, color="k", lw=0.8)
            ax.axvline(b + 0.5, color="k", lw=0.8)
    if n <= 40:
        ticks = [names[i] for i in order]
        ax.set_xticks(range(n), ticks, rotation=90, fontsize=6)
        ax.set_yticks(range(n), ticks, fontsize=6)
    ax.set_xlabel("source j (stimulated)")
    ax.set_ylabel("target i (responding)")
    ax.set_title(title)
    return _save(fig, path)


def plot_response(result: dict, path, modality: str | None = None, top: int = 5, window: int = 0,
                  names: list[str] | None = None) -> Path:
    """Δforecast over time after the context end for the ``top`` nodes with the largest peak |Δ|
    (``result`` from :meth:`Twin.perturb`); the stimulated nodes are drawn dashed."""
    m = modality or result["modality"]
    delta = np.asarray(result["delta"][m])
    if delta.ndim == 3:
        delta = delta[window]
    period = result["tr"] if m == "fmri" else 1.0 / result["eeg_sfreq"]
    t = np.arange(delta.shape[1]) * period
    peak = np.abs(delta).max(1)
    picks = list(np.argsort(-peak, kind="stable")[:top])
    fig, ax = plt.subplots(figsize=(7, 4))
    for i in picks:
        stimulated = m == result["modality"] and i in result["targets"]
        name = names[i] if names else f"node {i}"
        ax.plot(t, delta[i], "--" if stimulated else "-", marker="o" if delta.shape[1] <= 20 else None, ms=3,
                label=f"{name} (stimulated, dashed)" if stimulated else name)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("forecast step start, s after context end")
    ax.set_ylabel(f"Δ {m} forecast (z)")
    names = ", ".join(result.get("target_names", []))
    ax.set_title(f"response to {result['modality']} stimulus of {names} (amplitude {result['amplitude']:g})")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_brain(values: np.ndarray, pos: np.ndarray, path, edge_index=None, edge_weight=None,
               names: list[str] | None = None, highlight=(), title: str = "", label: str = "value") -> Path:
    """Top-view network: ``pos [N, 3]`` (MNI mm; x = left-right, y = posterior-anterior) projected onto
    x-y, nodes coloured by ``values [N]`` (diverging map if signed), edges ``edge_index [2, E]``
    (src -> dst) drawn with alpha by ``edge_weight [E]``; ``highlight`` slots get a black ring."""
    values = np.asarray(values, dtype=np.float64)
    xy = np.asarray(pos, dtype=np.float64)[:, :2]
    fig, ax = plt.subplots(figsize=(6, 6))
    if edge_index is not None and np.size(edge_index):
        ei = np.asarray(edge_index)
        w = np.ones(ei.shape[1]) if edge_weight is None else np.asarray(edge_weight, dtype=np.float64)
        w = w / (w.max() or 1.0)
        for (s, d), a in zip(ei.T, w):
            ax.plot(xy[[s, d], 0], xy[[s, d], 1], color="grey", alpha=0.15 + 0.5 * a, lw=0.5 + a, zorder=1)
    signed = bool(np.nanmin(values) < 0)
    cmap, lo, hi = _limits(values, signed)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, cmap=cmap, vmin=lo, vmax=hi, s=80, edgecolors="none", zorder=2)
    for i in highlight:
        ax.scatter(xy[i, 0], xy[i, 1], s=180, facecolors="none", edgecolors="k", lw=1.5, zorder=3)
    if names is not None and len(names) <= 40:
        for i, nm in enumerate(names):
            ax.annotate(nm, xy[i], fontsize=5, ha="center", va="bottom", zorder=4)
    fig.colorbar(sc, ax=ax, shrink=0.8, label=label)
    ax.set_aspect("equal")
    ax.set_xlabel("x (mm, left-right)")
    ax.set_ylabel("y (mm, posterior-anterior)")
    ax.set_title(title)
    return _save(fig, path)


def plot_forecast(context: np.ndarray, forecast: np.ndarray, path, period_s: float, std: np.ndarray | None = None,
                  nodes=None, names: list[str] | None = None, title: str = "") -> Path:
    """``context [N, T]`` and ``forecast [N, F]`` (same units and sample period ``period_s``) of ``nodes``
    (default: the first 4); time 0 = context end."""
    nodes = list(range(min(4, context.shape[0]))) if nodes is None else list(nodes)
    t_ctx = (np.arange(context.shape[1]) - context.shape[1]) * period_s
    t_fc = np.arange(forecast.shape[1]) * period_s
    fig, axes = plt.subplots(len(nodes), 1, figsize=(8, 1.8 * len(nodes)), sharex=True, squeeze=False)
    for ax, i in zip(axes[:, 0], nodes):
        ax.plot(t_ctx, context[i], color="k", lw=0.8, label="context")
        ax.plot(t_fc, forecast[i], color="C3", lw=1.2, marker="o" if forecast.shape[1] <= 20 else None,
                ms=3, label="forecast")
        if std is not None:
            ax.fill_between(t_fc, forecast[i] - std[i], forecast[i] + std[i], color="C3", alpha=0.25)
        ax.axvline(0, color="grey", lw=0.6)
        ax.set_ylabel(names[i] if names else f"node {i}", fontsize=7)
    axes[0, 0].legend(fontsize=7)
    axes[-1, 0].set_xlabel("time relative to context end (s)")
    axes[0, 0].set_title(title)
    return _save(fig, path)


def plot_attribution(attr: np.ndarray, path, period_s: float, names: list[str] | None = None,
                     title: str = "") -> Path:
    """Attribution map ``attr [N, T]`` (diverging colours; time axis in s from window start)."""
    attr = np.asarray(attr, dtype=np.float64)
    cmap, lo, hi = _limits(attr, True)
    fig, ax = plt.subplots(figsize=(8, 0.15 * attr.shape[0] + 2))
    im = ax.imshow(attr, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest",
                   extent=(0, attr.shape[1] * period_s, attr.shape[0] - 0.5, -0.5))
    fig.colorbar(im, ax=ax, label="attribution (z)")
    if names is not None and len(names) <= 40:
        ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("input time (s from window start)")
    ax.set_title(title)
    return _save(fig, path)


def plot_ec_glass_brain(ec: np.ndarray, pos_mm: np.ndarray, path, top: int = 30,
                        title: str = "strongest effective connections") -> Path:
    """Glass-brain connectome (nilearn, MNI mm) of the ``top`` strongest off-diagonal EC entries:
    ``ec [N, N]`` row = target, column = source; red = excitatory, blue = inhibitory; node size = summed
    |outgoing| EC (how much a region drives others). Slots without a position (NaN) are left out."""
    from nilearn import plotting

    ec = np.asarray(ec, dtype=np.float64)
    pos = np.asarray(pos_mm, dtype=np.float64)
    ok = np.isfinite(pos).all(1)
    a = np.where(np.eye(len(ec), dtype=bool), 0.0, np.nan_to_num(ec))[np.ix_(ok, ok)]
    flat = np.abs(a).ravel()
    k = min(int(top), int((flat > 0).sum()))
    thr = np.sort(flat)[-k] if k else np.inf
    # nilearn draws an undirected line per pair; keep the larger direction of each pair.
    keep = np.where(np.abs(a) >= np.abs(a.T), a, 0.0)
    keep[np.abs(keep) < thr] = 0.0
    sym = keep + keep.T
    out_strength = np.abs(a).sum(0)
    size = 10 + 60 * out_strength / (out_strength.max() or 1.0)
    fig = plt.figure(figsize=(9, 3.2))
    vmax = float(np.abs(sym).max()) or 1.0
    plotting.plot_connectome(sym, pos[ok], node_size=size, node_color="k", edge_cmap="RdBu_r",
                             edge_vmin=-vmax, edge_vmax=vmax, edge_threshold=None, display_mode="lzry",
                             colorbar=True, figure=fig, title=f"{title} (top {k}, MNI mm)")
    return _save(fig, path)
