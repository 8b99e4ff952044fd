"""Evaluation figures: every predictor on one axis per modality, and forecasts against the observed future.

* :func:`plot_horizons` - R² by horizon, TwinBrain and every baseline on the same axis, one panel per
  modality, the horizon in its unit (TR / EEG latent step) and in seconds.
* :func:`plot_forecast_example` - one held-out window: heatmaps of all nodes (observed context + future,
  TwinBrain's forecast, the strongest baseline's forecast, on one colour scale) and traces of the four
  most variable nodes with the observed future.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from twinbrain.schema import MODALITIES  # noqa: E402

MODEL_STYLE = {"color": "k", "lw": 2.2, "marker": "o", "zorder": 5}


def _horizon_seconds(m: str, protocol: dict) -> float:
    """Seconds per horizon step of modality ``m``."""
    if m == "fmri":
        return float(protocol["tr_s"])
    return float(protocol["tr_s"]) * protocol["eeg_stride"] / protocol["samples_per_tr"]


def plot_horizons(report: dict, path, labels: dict[str, dict[str, str]] | None = None) -> Path | None:
    """``report`` = ``eval/report.json``; ``labels[m][name]`` = display name of a baseline. None if empty."""
    fc, p = report.get("forecast", {}), report["protocol"]
    mods = [m for m in MODALITIES if m in fc]
    if not mods:
        return None
    fig, axes = plt.subplots(1, len(mods), figsize=(6.2 * len(mods), 6.0), squeeze=False)
    for ax, m in zip(axes[0], mods):
        f, hs = fc[m], fc[m]["horizons"]
        sec = _horizon_seconds(m, p)

        def y(vals):
            return [np.nan if v is None else v for v in vals]

        ax.plot(hs, y(f["model"]["r2"]), label="TwinBrain", **MODEL_STYLE)
        for i, (name, b) in enumerate(f["baselines"].items()):
            ax.plot(hs, y(b["r2"]), marker="s", ms=4, lw=1.2, color=f"C{i}",
                    label=(labels or {}).get(m, {}).get(name, name))
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        unit = "TR" if m == "fmri" else f"latent step = {p['eeg_stride']} samples"
        ax.set_xticks(hs, [f"{h}\n{h * sec:.3g} s" for h in hs])
        ax.set_xlabel(f"forecast horizon ({unit})")
        ax.set_ylabel("R² vs the global mean (held-out windows)")
        n = f["model"].get("n", [None])[0]
        ax.set_title(f"{m.upper()}: {p['split']} split, {p['n_windows']} windows" + (f", n = {int(n)}/horizon" if n else ""),
                     fontsize=10)
        ax.grid(alpha=0.3)
        # Below the panel: inside, seven entries covered the curves they name.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), frameon=False)
    fig.suptitle("forecast R² by horizon: TwinBrain and every baseline", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_forecast_example(ex: dict, path, period_s: float, modality: str, names: list[str] | None = None,
                          strongest: str | None = None, labels: dict[str, str] | None = None,
                          context_steps: int | None = None) -> Path:
    """One window of one modality (``ex`` from ``evaluate_forecasts(...)['example'][m]``).

    ``period_s``: seconds per signal sample. ``strongest``: the baseline drawn beside TwinBrain (default:
    the first). ``context_steps``: context samples shown before the forecast (default 3x the forecast)."""
    ctx, obs, mod = (np.asarray(ex[k], np.float64) for k in ("context", "observed", "model"))
    base = ex["baselines"]
    strongest = strongest if strongest in base else next(iter(base))
    bl = np.asarray(base[strongest], np.float64)
    f = obs.shape[1]
    c = min(ctx.shape[1], context_steps or 3 * f)
    ctx = ctx[:, -c:]
    # t = 0 is the last context sample; forecast step h lands at h * period_s; cells centred on their time
    t0, t1 = (-c + 0.5) * period_s, (f + 0.5) * period_s
    panels = [("observed (context | future)", np.concatenate([ctx, obs], 1)),
              ("TwinBrain forecast", np.concatenate([ctx, mod], 1)),
              (f"{(labels or {}).get(strongest, strongest)} forecast", np.concatenate([ctx, bl], 1))]
    lim = float(np.nanpercentile(np.abs(panels[0][1]), 99)) or 1.0
    fig = plt.figure(figsize=(13, 7.5))
    gs = fig.add_gridspec(2, 3, height_ratios=(1.3, 1), hspace=0.35)
    for j, (title, img) in enumerate(panels):
        ax = fig.add_subplot(gs[0, j])
        im = ax.imshow(img, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest",
                       extent=(t0, t1, img.shape[0] - 0.5, -0.5))
        ax.axvline(0.5 * period_s, color="k", lw=1)
        ax.set_title(textwrap.fill(title, 40), fontsize=9)     # a tuned baseline's label is long
        ax.set_xlabel("time from the last context sample (s)")
        if names is not None and len(names) <= 40:
            ax.set_yticks(range(len(names)), names, fontsize=5)
        if j == 0:
            ax.set_ylabel(f"{modality} node")
    fig.colorbar(im, ax=fig.axes, shrink=0.5, label="signal (z)", location="right")
    picks = np.argsort(-np.nanvar(np.concatenate([ctx, obs], 1), 1), kind="stable")[:4]
    t_ctx = (np.arange(c) - c + 1) * period_s
    t_fc = (np.arange(f) + 1) * period_s
    both = np.concatenate([ctx, obs, mod, bl], 1)[picks]
    gap = 1.15 * float(np.nanmax(both.max(1) - both.min(1))) or 1.0
    for k, i in enumerate(picks):
        ax = fig.add_subplot(gs[1, :]) if k == 0 else ax
        off = -gap * k
        ax.plot(t_ctx, ctx[i] + off, color="grey", lw=0.9, label="context" if k == 0 else None)
        ax.plot(t_fc, obs[i] + off, color="k", lw=1.4, label="observed future" if k == 0 else None)
        ax.plot(t_fc, mod[i] + off, color="C3", lw=1.4, label="TwinBrain" if k == 0 else None)
        ax.plot(t_fc, bl[i] + off, color="C0", lw=1.2, ls="--",
                label=(labels or {}).get(strongest, strongest) if k == 0 else None)
    ax.axvline(0.5 * period_s, color="k", lw=0.8)
    ax.set_yticks([-gap * k for k in range(len(picks))],
                  [names[i] if names else f"node {i}" for i in picks], fontsize=7)
    ax.set_xlabel("time from the last context sample (s)")
    ax.set_ylabel(f"signal (z), offset per node\n(4 most variable {modality} nodes)", fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{modality.upper()} forecast of held-out window {ex.get('window', '?')}", fontsize=11)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
