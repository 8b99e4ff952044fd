"""Forecast evaluation: the model and every baseline on the SAME held-out windows, contexts and targets.

Protocol for one window of ``T_f`` TRs (``H = max(eval.horizons) <= model.forecast_steps``):

* context = the first ``T_ctx = T_f - H`` TRs of BOTH modalities (EEG: ``T_ctx * samples_per_tr`` samples,
  the same wall-clock span). The model is run on the context alone ("causal re-encoding of the context
  only") and read at its last latent step; the full window is also run, and the largest difference
  between the two readings is reported as a live causality check (0 up to float round-off).
* targets = the clean signal after the context: fMRI volumes ``T_ctx + h - 1`` for ``h = 1..H``; EEG
  samples ``T_ctx * spt + k`` for ``k < H * eeg_stride``. EEG horizon ``h`` is the model's latent step
  ``h``: the ``eeg_stride`` samples ``[(h - 1) * stride, h * stride)`` after the context, pooled.
* baselines see the same context arrays (signal samples: TRs for fMRI, raw EEG samples for EEG), are
  iterated sample by sample to ``H * step`` samples and scored against the same targets with the same
  node mask, so every model/baseline pair counts exactly the same elements (``n`` in the report).

Baselines are fitted once on the training subjects' normalised training spans (:func:`train_series`).
All sums are streaming accumulators (``MetricSet``) all-reduced at the end, so windows may be sharded
over ranks (``rank`` / ``world_size``) and the numbers are global.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch_geometric.data import Batch

from twinbrain.data.series import coupling_prior, span_series
from twinbrain.data.timing import volumes
from twinbrain.model.twinbrain import core_kind, core_modalities
from twinbrain.schema import samples_per_step
from twinbrain.scoring.baselines import build_baselines, fit_baselines, tuned_baselines
from twinbrain.scoring.metrics import MetricSet, all_reduce_sum, skill


def select_windows(n_windows: int, max_windows: int) -> np.ndarray:
    """Indices (dataset order) of the evaluated windows, ``[W]`` int64: all when ``max_windows == 0``,
    else ``max_windows`` evenly spaced ones (so every held-out subject keeps windows)."""
    if max_windows <= 0 or max_windows >= n_windows:
        return np.arange(n_windows, dtype=np.int64)
    return np.unique(np.linspace(0, n_windows - 1, max_windows).round().astype(np.int64))


def train_series(dm, modality: str, split: str = "train") -> list[np.ndarray]:
    """Normalised spans of one split of ``dm`` (default: the training subjects' training spans): one
    float64 ``[N, T]`` per span, in TRs (fMRI) or EEG samples, z-scored exactly as the windows are
    (missing slots are 0)."""
    return span_series(dm.cohort, dm.stats, dm.split.spans(split), modality)


def truncate(data, t_ctx: int, spt: int):
    """Shallow copy of one window (``HeteroData``) cut to its first ``t_ctx`` TRs in both modalities
    (``x`` and ``y``; fMRI ``[N_f, t_ctx, 1]``, EEG ``[N_e, t_ctx * spt, 1]``). Graph and ids are shared."""
    out = copy.copy(data)
    for m, n in (("fmri", t_ctx), ("eeg", t_ctx * spt)):
        out[m].x = data[m].x[:, :n]
        out[m].y = data[m].y[:, :n]
    return out


class CovAccumulator:
    """Streaming covariance of ``[N]``-variate series (for FC): sums of ``x``, ``x xᵀ`` and the count."""

    def __init__(self, n: int):
        self.n = torch.zeros((), dtype=torch.float64)
        self.s = torch.zeros(n, dtype=torch.float64)
        self.ss = torch.zeros(n, n, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """``x [N, T]``: T new samples of the N series."""
        x = x.detach().to("cpu", torch.float64)
        self.n += x.shape[1]
        self.s += x.sum(1)
        self.ss += x @ x.T

    def all_reduce(self) -> "CovAccumulator":
        self.n, self.s, self.ss = all_reduce_sum([self.n, self.s, self.ss])
        return self

    def corr(self) -> np.ndarray:
        """``[N, N]`` Pearson correlation (NaN rows for constant series)."""
        n = float(self.n.clamp_min(1))
        cov = self.ss / n - torch.outer(self.s, self.s) / n ** 2
        sd = cov.diagonal().clamp_min(0).sqrt()
        return (cov / torch.outer(sd, sd)).numpy()


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _series(ms: MetricSet, m: str, horizons: list[int], names: tuple[str, ...]) -> dict[str, list]:
    res = ms.compute()
    return {k: [_finite(res[(m, k, h)]) for h in horizons] for k in names if (m, k, horizons[0]) in res}


def has_core(mc, modality: str) -> bool:
    """Whether the twin forecasts ``modality`` with a linear core (:func:`core_modalities`)."""
    return modality in core_modalities(mc)


def svar_core(mc, modality: str) -> str:
    """The twin's core kind of ``modality`` (:func:`core_kind`; ``var`` without a core): the ``svar`` baseline
    is fitted with the twin's own core selection."""
    return core_kind(mc, modality) if has_core(mc, modality) else "var"


def svar_prior(cfg, modality: str, train) -> np.ndarray | None:
    """The prior the twin's core was selected with (``model.coupling_prior``) where ``modality`` has a linear
    core, else None: the ``svar`` baseline stays the twin's step-0 core."""
    if not has_core(cfg.model, modality):
        return None
    return coupling_prior(cfg.model.coupling_prior, train, modality, cfg.graph.structural)


def strongest_baseline(r2: dict[str, np.ndarray]) -> list[str]:
    """Per horizon, the name of the baseline with the highest R² (``r2[name]`` is ``[H]``, NaN = missing;
    ties keep the first name in ``r2``'s order)."""
    names = list(r2)
    table = np.stack([np.where(np.isfinite(r2[k]), r2[k], -np.inf) for k in names])     # [B, H]
    return [names[i] for i in table.argmax(0)]


@dataclass(frozen=True)
class _Geometry:
    """Lengths of the protocol (module docstring): ``t_f`` / ``t_ctx`` TRs of a window and of its context,
    and per modality the signal samples of one latent step (``step``), of the context (``ctx_len``) and
    the latent steps of the context (``lat_ctx``)."""
    horizons: list[int]
    h_max: int
    s_steps: int
    spt: int
    t_f: int
    t_ctx: int
    step: dict[str, int]
    ctx_len: dict[str, int]
    lat_ctx: dict[str, int]
    hsel: torch.Tensor          # [len(horizons)] 0-based horizon indices
    prob: bool


def _geometry(cfg, dm) -> _Geometry:
    """The protocol's lengths for ``cfg`` on ``dm``; refuses a context shorter than the largest baseline order."""
    e, mc = cfg.eval, cfg.model
    horizons = sorted(set(int(h) for h in e.horizons))
    h_max, s_steps, spt = horizons[-1], mc.forecast_steps, dm.samples_per_tr
    t_f = volumes(cfg.data.window_s, dm.tr, "data.window_s")
    t_ctx = t_f - h_max
    max_order = max(e.baseline_orders) if e.tune_baselines else e.ar_order
    if t_ctx < max(max_order, 2):
        raise ValueError(f"windows of {t_f} TRs leave {t_ctx} context TRs for horizons up to {h_max}; need "
                         f"at least {max(max_order, 2)} (the largest baseline order, eval.baseline_orders / "
                         f"eval.ar_order); use longer windows, shorter horizons or lower orders")
    return _Geometry(horizons=horizons, h_max=h_max, s_steps=s_steps, spt=spt, t_f=t_f, t_ctx=t_ctx,
                     step=samples_per_step(mc), ctx_len={"fmri": t_ctx, "eeg": t_ctx * spt},
                     lat_ctx={"fmri": t_ctx, "eeg": t_ctx * spt // mc.eeg_stride},     # latent steps in the context
                     hsel=torch.tensor([h - 1 for h in horizons]), prob=mc.probabilistic == "gaussian")


def _fit_split_baselines(dm, cfg, mods, mlp: bool) -> tuple[dict, dict]:
    """Every baseline of every modality, fitted on the training spans: ``base[m][name]``, and
    ``tuning[m]`` (the hyper-parameters chosen when ``eval.tune_baselines``)."""
    e, mc = cfg.eval, cfg.model
    base, tuning = {}, {}
    with torch.enable_grad():           # the MLP baseline trains by gradient descent
        for m in mods:
            if e.tune_baselines:        # hyper-parameters chosen on the validation split, never on test
                train = train_series(dm, m)
                base[m], tuning[m] = tuned_baselines(train, train_series(dm, m, "val"),
                                                     orders=e.baseline_orders, alphas=e.baseline_alphas, mlp=mlp,
                                                     core=svar_core(mc, m), prior=svar_prior(cfg, m, train))
            else:
                base[m] = fit_baselines(build_baselines(e.ar_order, e.ridge_alpha, mlp), train_series(dm, m))
    return base, tuning


class _Scores:
    """The streaming accumulators of one evaluation: forecast metrics of the model and of every baseline,
    reconstruction, the causality check (``diff[j]``), FC and the example window."""

    def __init__(self, mods, horizons: list[int], names: list[str], prob: bool, n_fmri_slots: int):
        self.sets = {"model": MetricSet(mods, horizons, probabilistic=prob)}
        self.sets.update({b: MetricSet(mods, horizons) for b in names})
        self.recon = MetricSet(mods)
        self.diff = torch.zeros(len(mods), dtype=torch.float64)
        self.fc_model, self.fc_emp = CovAccumulator(n_fmri_slots), CovAccumulator(n_fmri_slots)
        self.present = torch.ones(n_fmri_slots, dtype=torch.bool)
        self.example: dict[str, dict] = {}

    def all_reduce(self) -> None:
        for s in [*self.sets.values(), self.recon]:
            s.all_reduce()
        self.fc_model.all_reduce()
        self.fc_emp.all_reduce()
        (self.diff,) = all_reduce_sum([self.diff])        # several ranks: the sum bounds the max from above


def _score_modality(sc: _Scores, g: _Geometry, j: int, m: str, b: int, full, out_full, out_ctx, base_m: dict,
                    first_window: int | None) -> None:
    """Score modality ``m`` (index ``j``) of ``b`` windows: ``full`` / ``out_full`` the whole windows and the
    model's output on them, ``out_ctx`` its output on the contexts alone, ``base_m`` the fitted baselines.
    ``first_window``: the dataset index of the batch's first window when it is the evaluation's first."""
    f = g.h_max * g.step[m]
    y = full[m].y[..., 0].float().view(b, -1, g.t_f * (1 if m == "fmri" else g.spt))   # [B, N, T_m]
    n = y.shape[1]
    keep = full[m].mask.bool().view(b, n)                                           # [B, N]
    c = g.ctx_len[m]
    target = y[:, :, c:c + f]                                                       # [B, N, H*step]

    def hv(x: torch.Tensor) -> torch.Tensor:    # [B, N, H*step] -> [B, N, step, len(horizons)]
        return x.reshape(b, n, g.h_max, g.step[m]).transpose(-1, -2)[..., g.hsel.to(x.device)]

    mask = keep[:, :, None, None]
    pred = out_ctx.forecast[m].float().view(b, n, g.lat_ctx[m], g.s_steps * g.step[m])[:, :, -1, :f]
    std = None
    if g.prob:
        std = hv(out_ctx.forecast_std[m].float().view(b, n, g.lat_ctx[m], -1)[:, :, -1, :f])
    sc.sets["model"].update(m, hv(pred), hv(target), mask, std=std)
    l_full = out_full.forecast[m].shape[1]
    same = out_full.forecast[m].float().view(b, n, l_full, -1)[:, :, g.lat_ctx[m] - 1, :f]
    sc.diff[j] = max(float(sc.diff[j]), float((same - pred).abs().max()))
    ctx_np = y[:, :, :c].cpu().numpy()
    first = first_window is not None and m not in sc.example
    if first:       # the first evaluated window, kept whole for the forecast figures
        sc.example[m] = {"context": ctx_np[0], "observed": target[0].cpu().numpy(),
                         "model": pred[0].cpu().numpy(), "mask": keep[0].cpu().numpy(),
                         "window": int(first_window), "baselines": {}}
    for name, bl in base_m.items():
        bp = torch.as_tensor(bl.predict(ctx_np, f), dtype=torch.float32, device=y.device)
        sc.sets[name].update(m, hv(bp), hv(target), mask)
        if first:
            sc.example[m]["baselines"][name] = bp[0].cpu().numpy()
    sc.recon.update(m, out_full.recon[m].float()[..., 0].view(b, n, -1), y, keep[:, :, None])
    if m == "fmri":      # one-step-ahead forecast series over the full window, for model FC
        one = out_full.forecast[m].float().view(b, n, l_full, -1)[:, :, :-1, 0]     # [B, N, T_f - 1]
        for w in range(b):
            sc.fc_model.update(one[w])
            sc.fc_emp.update(y[w, :, 1:])
        sc.present &= keep.all(0).cpu()


def _forecast_summary(sets: dict[str, MetricSet], m: str, horizons: list[int], names: list[str],
                      unit: str) -> dict:
    """``forecast[m]`` of the report: per-horizon metrics of the model and the baselines, the strongest
    baseline per horizon and the model's skill over it and over persistence."""
    metric_names = ("r2", "pearson", "mse", "n", "crps", "coverage_50", "coverage_90")
    mod = _series(sets["model"], m, horizons, metric_names)
    bls = {k: _series(sets[k], m, horizons, ("r2", "pearson", "mse", "n")) for k in names}
    model_r2 = np.array([np.nan if v is None else v for v in mod["r2"]], dtype=np.float64)
    r2 = {k: np.array([np.nan if v is None else v for v in bls[k]["r2"]], dtype=np.float64) for k in names}
    strongest = strongest_baseline(r2)
    best_r2 = np.array([r2[k][i] for i, k in enumerate(strongest)], dtype=np.float64)
    sk = {"strongest": [_finite(v) for v in np.atleast_1d(skill(model_r2, best_r2))],
          "persistence": [_finite(v) for v in np.atleast_1d(skill(model_r2, r2["persistence"]))]}
    return {"horizons": horizons, "unit": unit, "model": mod, "baselines": bls, "strongest": strongest, "skill": sk}


@torch.no_grad()
def evaluate_forecasts(model, dm, split: str, cfg, *, device, batch_size: int = 8, mlp: bool = True,
                       rank: int = 0, world_size: int = 1) -> dict:
    """Model vs baselines on ``split`` of a set-up ``DataModule`` (see the module docstring).

    Args:
        model: a ``TwinBrain`` in eval mode on ``device``. cfg: the run's ``Config``.
        batch_size: windows per forward pass. mlp: also fit and run the MLP baseline.
        rank, world_size: shard the windows (``window[rank::world_size]``); results are all-reduced.
    Returns a JSON-ready dict: ``protocol``, ``forecast[m]`` (per-horizon lists for the model, every
    baseline and the skill scores), ``reconstruction[m]``, ``causality[m]`` (max |full - truncated|),
    ``fc`` (``model`` / ``empirical`` ``[N_f, N_f]`` numpy arrays for the validity section) and
    ``example[m]`` (this rank's first window: ``context [N, T_ctx]``, ``observed`` / ``model`` /
    ``baselines[name]`` ``[N, H*step]`` in signal samples, ``mask [N]``; numpy, for the figures).
    """
    e, mc = cfg.eval, cfg.model
    ds = dm.dataset(split)
    if len(ds) == 0:
        raise ValueError(f"split '{split}' has no window to evaluate (data.split={cfg.data.split})")
    g = _geometry(cfg, dm)
    horizons, t_ctx, spt = g.horizons, g.t_ctx, g.spt
    mods = dm.modalities                # fMRI-only cohorts score no EEG
    base, tuning = _fit_split_baselines(dm, cfg, mods, mlp)
    names = list(base[mods[0]])
    sc = _Scores(mods, horizons, names, g.prob, dm.n_fmri_slots)

    all_idx = select_windows(len(ds), e.max_windows)
    idx = all_idx[rank::world_size]
    for c0 in range(0, len(idx), batch_size):
        datas = [ds[int(i)] for i in idx[c0:c0 + batch_size]]
        full = Batch.from_data_list(datas).to(device)
        ctx = Batch.from_data_list([truncate(d, t_ctx, spt) for d in datas]).to(device)
        out_full, out_ctx = model(full), model(ctx)
        for j, m in enumerate(mods):
            _score_modality(sc, g, j, m, len(datas), full, out_full, out_ctx, base[m],
                            int(idx[0]) if c0 == 0 else None)

    sc.all_reduce()
    var_name = next(k for k in names if k.startswith("var"))
    forecast = {m: _forecast_summary(sc.sets, m, horizons, names,
                                     "TR" if m == "fmri" else f"{mc.eeg_stride} EEG samples") for m in mods}
    rec = sc.recon.compute()
    reconstruction = {m: {"r2": _finite(rec[(m, "r2", 0)]), "pearson": _finite(rec[(m, "pearson", 0)]),
                          "n": rec[(m, "n", 0)]} for m in mods}
    protocol = {"split": split, "window_trs": g.t_f, "context_trs": t_ctx, "context_eeg_samples": t_ctx * spt,
                "horizons": horizons, "forecast_steps": g.s_steps, "eeg_stride": mc.eeg_stride,
                "samples_per_tr": spt, "tr_s": dm.tr, "n_windows": int(len(all_idx)),
                "n_windows_in_split": len(ds), "max_windows": e.max_windows, "baselines": names,
                "var_baseline": var_name, "tuned": bool(e.tune_baselines), "baseline_tuning": tuning,
                "ar_order": e.ar_order, "ridge_alpha": e.ridge_alpha,
                "probabilistic": g.prob, "subjects": list(dm.split.subjects.get(split, [])),
                "window_index": [int(i) for i in all_idx]}
    return {"protocol": protocol, "forecast": forecast, "reconstruction": reconstruction,
            "causality": {m: float(sc.diff[j]) for j, m in enumerate(mods)},
            "fc": {"model": sc.fc_model.corr(), "empirical": sc.fc_emp.corr(), "present": sc.present.numpy()},
            "example": sc.example}
