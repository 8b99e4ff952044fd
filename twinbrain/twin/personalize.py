"""Few-shot personalisation: fit a subject's embedding rows in a trained twin, training nothing else.

Two cases: a **new** subject (not in the model) gets new rows; a **held-out** subject (in the subject map
because it was in the cohort, but in the validation/test split, so its rows were never trained) has its
existing, untouched rows fitted. A subject of the training split is refused: its rows are already fitted.

The model gets one new ``subject_emb`` row and one new ``session_emb`` row per session of the new subject
(and the matching rows of the session affine layer, if the model has one), all starting at zero, which
is exactly how the model treats an unseen subject (the population model). Every other parameter, and
every old row, is frozen: their gradients are masked, the optimizer is Adam without weight decay, so
they stay bit-identical. The objective is the training loss on reconstruction + forecasting
(``fmri_recon + fmri_forecast + eeg_recon + eeg_forecast``, :func:`twinbrain.model.loss_terms` normalised
by counts, weighted by ``train.forecast_weight``): the training step's module,
:func:`twinbrain.model.build_train_module` with ``objective='signal'``.

Each recording of the new subject is split chronologically: the first ``adapt_fraction`` of its span
gives the adaptation windows (and the z-scoring statistics, so the held-out part is never seen), the
rest gives held-out windows; the report compares held-out forecast loss and R² before and after.
"""
from __future__ import annotations

import copy

import torch
from torch_geometric.data import Batch, HeteroData

from twinbrain.data.graph import build_run_graph
from twinbrain.data.timing import common_span, samples_per_tr
from twinbrain.data.types import Cohort, Recording
from twinbrain.data.windows import NormStats, RecStats, Split, WindowDataset, compute_norm_stats
from twinbrain.model import build_model, build_train_module, forecast_targets, forecast_valid, loss_terms
from twinbrain.model.twinbrain import PERSONAL_SUFFIXES
from twinbrain.schema import MODALITIES, SIGNAL_LOSS_TERMS, samples_per_step
from twinbrain.scoring.metrics import R2Accumulator, skill


# ------------------------------------------------------------------ windows of new recordings

def _as_recordings(data, subject: str | None) -> list[Recording]:
    recs = data.recordings if isinstance(data, Cohort) else [data] if isinstance(data, Recording) else list(data)
    if subject is not None:
        recs = [r for r in recs if r.subject == str(subject)]
    subs = sorted({r.subject for r in recs})
    if len(subs) != 1:
        raise ValueError(f"personalisation needs the recordings of exactly one subject, got {subs or 'none'}; "
                         f"pass subject=... to pick one")
    return recs


def _check_geometry(twin, recs: list[Recording]) -> None:
    for r in recs:
        r.check()
        if r.region_names != twin.node_names("fmri") or r.channel_names != twin.node_names("eeg"):
            raise ValueError(f"{r.key}: region/channel slots differ from the model's; map the recording onto the "
                             f"same atlas ({twin.n_nodes('fmri')} regions) and channel list first")
        if abs(r.tr - twin.tr) > 1e-9 or samples_per_tr(r) != twin.samples_per_tr:
            raise ValueError(f"{r.key}: TR {r.tr} s / {samples_per_tr(r)} EEG samples per TR differ from the "
                             f"model's ({twin.tr} s / {twin.samples_per_tr}); resample first")


def _graphs(twin, recs: list[Recording], spans: list[tuple[int, float, float]]):
    """Group scope: the training cohort's group graph. Run scope: each recording's own graph, fitted on
    its adaptation span only."""
    if twin.cfg.graph.scope == "group":
        return twin.data.group_graph
    band = (twin.cfg.data.eeg_l_freq, twin.cfg.data.eeg_h_freq)
    return {i: build_run_graph(recs[i], (s, e), twin.cfg.graph, band) for i, s, e in spans}


def _dataset(twin, recs, spans, stats: NormStats, graphs, maps) -> list[HeteroData]:
    ds = WindowDataset(Cohort(recs), spans, graphs, stats, maps[0], maps[1],
                       window_s=twin.cfg.data.window_s, stride_s=twin.cfg.data.stride_s)
    return [ds[i] for i in range(len(ds))]


def recording_windows(twin, recordings, spans=None) -> list[HeteroData]:
    """Windows of recordings of a subject the twin knows but whose data are not in the training cohort
    (a personalised subject). Statistics: the personalisation record's, else the recording's own
    ``spans`` (default: whole span). ``spans``: ``[(rec_index, start_s, end_s)]`` into ``recordings``."""
    recs = [recordings] if isinstance(recordings, Recording) else list(getattr(recordings, "recordings", recordings))
    _check_geometry(twin, recs)
    missing = sorted({r.subject for r in recs} - set(twin.meta["subject_map"]))
    if missing:
        raise ValueError(f"subjects {missing} are not in the model; personalise it first (Twin.personalize)")
    spans = spans or [(i, *common_span(r)) for i, r in enumerate(recs)]
    record = twin.meta.get("personalized", {})
    per = {}
    for i, r in enumerate(recs):
        saved = record.get(r.subject, {}).get("norm_stats", {}).get(r.key)
        per[i] = RecStats.from_dict(saved) if saved else None
    if any(v is None for v in per.values()):
        own = compute_norm_stats(Cohort(recs), Split(train=list(spans), val=[], test=[]))
        per = {i: v or own.per_rec[i] for i, v in per.items()}
    stats = NormStats(per, next(iter(per.values())))
    return _dataset(twin, recs, spans, stats, _graphs(twin, recs, spans),
                    (twin.meta["subject_map"], twin.meta["session_map"]))


# ------------------------------------------------------------------ model surgery

def extend_model(twin, n_new_subjects: int, n_new_sessions: int):
    """A copy of the model with ``n_new_subjects`` subject and ``n_new_sessions`` session rows appended to
    every embedding indexed by them (zeros); everything else copied. Returns ``(model, first_new_row)``
    where ``first_new_row[name]`` is the first new row of each grown parameter."""
    old = twin.model
    sd = old.state_dict()
    n_sub, n_ses = len(twin.meta["subject_map"]), len(twin.meta["session_map"])
    new = build_model(twin.cfg, n_subjects=n_sub + n_new_subjects, n_sessions=n_ses + n_new_sessions,
                      n_fmri_slots=twin.n_nodes("fmri"), n_eeg_slots=twin.n_nodes("eeg"),
                      samples_per_tr=twin.samples_per_tr)
    grown_ok = set(new.embedding_parameter_names())
    state, first = {}, {}
    for k, v in new.state_dict().items():
        if sd[k].shape == v.shape:
            state[k] = sd[k].clone()
        elif k in grown_ok and sd[k].shape[1:] == v.shape[1:]:   # old rows kept, new rows zero
            state[k] = torch.cat([sd[k].to(v.device), torch.zeros_like(v[sd[k].shape[0]:])])
            first[k] = sd[k].shape[0]
        else:
            raise RuntimeError(f"cannot extend '{k}' from {tuple(sd[k].shape)} to {tuple(v.shape)}: only "
                               f"subject/session embeddings may grow with new subjects")
    new.load_state_dict(state, strict=True)
    return new.to(twin.device).eval(), first


def _trainable(model, rows: dict[str, list[int]]) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, row mask) of every embedding with rows to fit (those rows 1, all others 0); freezes
    everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    out = []
    for name, p in model.named_parameters():
        if rows.get(name):
            mask = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)), device=p.device)
            mask[rows[name]] = 1.0
            p.requires_grad_(True)
            out.append((p, mask))
    return out


def fit_rows(model, subject_index: int, session_indices: list[int], n_sessions: int) -> dict[str, list[int]]:
    """Rows of each embedding parameter that belong to one subject and its sessions: the subject row,
    the session rows, and each session's block of the session affine layer (``n_sessions * slots`` rows)."""
    rows: dict[str, list[int]] = {}
    for name in model.embedding_parameter_names():
        n = dict(model.named_parameters())[name].shape[0]
        if name.startswith("subject_embed.") or name.endswith(PERSONAL_SUFFIXES):   # per-subject rows
            rows[name] = [subject_index]
        elif name.startswith("session_embed."):
            rows[name] = list(session_indices)
        else:                                   # session_affine: n_sessions blocks of `per` slots
            per = n // n_sessions
            rows[name] = [s * per + k for s in session_indices for k in range(per)]
    return rows


@torch.no_grad()
def heldout_scores(model, windows: list[HeteroData], cfg, batch_size: int = 8) -> dict[str, float]:
    """Forecast loss (mean of ``train.loss`` over valid forecast entries, per modality and summed) and
    forecast R² (all horizons pooled, and horizon 1) with persistence skill at horizon 1."""
    s_steps, device = cfg.model.forecast_steps, next(model.parameters()).device
    sums = {k: 0.0 for k in SIGNAL_LOSS_TERMS}
    counts = {k: 0.0 for k in SIGNAL_LOSS_TERMS}
    acc = {(m, k): R2Accumulator() for m in MODALITIES for k in ("all", "h1", "persist_h1")}
    for a in range(0, len(windows), batch_size):
        batch = Batch.from_data_list(windows[a:a + batch_size]).to(device)
        out = model(batch)
        for k, (s, c) in loss_terms(batch, out, cfg.train, cfg.model).items():
            if k in sums:
                sums[k] += float(s)
                counts[k] += float(c)
        for m in MODALITIES:
            step = samples_per_step(cfg.model)[m]
            y = batch[m].y[..., 0].float()
            tgt = forecast_targets(y, step, s_steps)
            valid = batch[m].mask.bool()[:, None, None] & forecast_valid(y.shape[1], step, s_steps, device)[None]
            pred = out.forecast[m].float()
            acc[m, "all"].update(pred, tgt, valid)
            acc[m, "h1"].update(pred[..., :step], tgt[..., :step], valid[..., :step])
            held = y[:, step - 1::step][:, :, None].expand(-1, -1, step)          # last sample of step t, held
            acc[m, "persist_h1"].update(held, tgt[..., :step], valid[..., :step])
    res = {k: sums[k] / max(counts[k], 1.0) for k in SIGNAL_LOSS_TERMS}
    res["forecast_loss"] = sum(res[f"{m}_forecast"] for m in MODALITIES)
    for m in MODALITIES:
        res[f"{m}_r2"] = float(acc[m, "all"].compute())
        res[f"{m}_r2_h1"] = float(acc[m, "h1"].compute())
        res[f"{m}_skill_h1"] = float(skill(res[f"{m}_r2_h1"], float(acc[m, "persist_h1"].compute())))
    return res


# ------------------------------------------------------------------ personalisation

def _check_personalisable(meta: dict, sub: str) -> None:
    """Refuse a subject personalised already or fitted in training (its embedding needs no fit)."""
    trained = (meta.get("split") or {}).get("subjects", {}).get("train", [])
    if sub in meta.get("personalized", {}):
        raise ValueError(f"subject '{sub}' is already in the model, personalised (index "
                         f"{meta['subject_map'][sub]}); personalise the original twin again instead")
    if sub in meta["subject_map"] and sub in trained:
        raise ValueError(f"subject '{sub}' was a training subject (index {meta['subject_map'][sub]}); its "
                         f"embedding is already fitted. Personalise a held-out (val/test) or a new subject")


def _fit_new_rows(model, params: list, w_fit: list, w_check: list, cfg, bs: int, *, steps: int, lr: float,
                  seed: int, device) -> tuple[list[float], int]:
    """``steps`` Adam steps on random batches of ``bs`` windows of ``w_fit``, only the masked rows of
    ``params`` (``[(parameter, row mask)]``) learning; the rows of the step with the lowest forecast loss on
    ``w_check`` (checked about ten times, and at step 0) are kept. Returns ``(losses, best_step)``."""
    check_every = max(1, int(steps) // 10)

    def check_loss() -> float:
        return heldout_scores(model, w_check, cfg, bs)["forecast_loss"] if w_check else -float(len(losses))

    # The training step's module with the signal objective (fixed weights, no balancer, no penalty).
    module = build_train_module(model, cfg.train, cfg.model, objective="signal").to(device)
    opt = torch.optim.Adam([p for p, _ in params], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    best = (check_loss(), 0, [p.detach().clone() for p, _ in params])
    for step in range(1, int(steps) + 1):
        pick = torch.randperm(len(w_fit), generator=gen)[:bs].tolist()
        batch = Batch.from_data_list([w_fit[i] for i in pick]).to(device)
        loss, _ = module(batch, module.counts(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p, mask in params:          # only the new rows learn
            p.grad.mul_(mask)
        opt.step()
        losses.append(float(loss.detach()))
        if step % check_every == 0 or step == int(steps):
            cur = check_loss()
            if cur < best[0]:
                best = (cur, step, [p.detach().clone() for p, _ in params])
    with torch.no_grad():
        for (p, _), kept in zip(params, best[2]):
            p.copy_(kept)
    return losses, best[1]


def fit_subject(twin, data, *, subject: str | None = None, steps: int = 100, lr: float = 1e-2,
                adapt_fraction: float = 0.5, batch_size: int | None = None, seed: int = 0):
    """Fit one subject from ``data`` (Recording, list of Recordings or Cohort) -> ``(model, metadata, report)``.

    ``steps`` Adam steps at learning rate ``lr`` on random batches of ``batch_size`` (default
    ``train.batch_size``) adaptation windows. Returns the parts of the personalised twin (which
    :meth:`Twin.personalize` wraps, with the same config and data): the model with the extended
    embeddings, the metadata with the extended maps (``subject_map[subject] = previous size``) and a
    ``metadata['personalized']`` record (recordings, statistics, spans, report), and the ``report``:
    ``before`` / ``after`` held-out scores (:func:`heldout_scores`), window counts, losses.
    """
    if not 0.0 < adapt_fraction < 1.0:
        raise ValueError(f"adapt_fraction must be in (0, 1), got {adapt_fraction}")
    recs = _as_recordings(data, subject)
    _check_geometry(twin, recs)
    sub = recs[0].subject
    known = sub in twin.meta["subject_map"]
    _check_personalisable(twin.meta, sub)
    cfg = twin.cfg
    adapt, held = [], []
    for i, r in enumerate(recs):
        s, e = common_span(r)
        cut = s + adapt_fraction * (e - s)
        adapt.append((i, s, cut))
        held.append((i, cut, e))
    stats = compute_norm_stats(Cohort(recs), Split(train=adapt, val=[], test=held))
    meta = copy.deepcopy(twin.meta)
    n_sub, n_ses = len(meta["subject_map"]), len(meta["session_map"])
    sessions = sorted({f"{sub}/{r.session}" for r in recs})
    new_sessions = [k for k in sessions if k not in meta["session_map"]]
    if not known:
        meta["subject_map"][sub] = n_sub
    meta["session_map"].update({k: n_ses + q for q, k in enumerate(new_sessions)})
    graphs = _graphs(twin, recs, adapt)
    maps = (meta["subject_map"], meta["session_map"])
    w_adapt = _dataset(twin, recs, adapt, stats, graphs, maps)
    w_held = _dataset(twin, recs, held, stats, graphs, maps)
    if not w_adapt or not w_held:
        raise ValueError(f"subject '{sub}': {len(w_adapt)} adaptation / {len(w_held)} held-out windows of "
                         f"{cfg.data.window_s} s; record at least {2 * cfg.data.window_s / 60:.1f} min or change "
                         f"adapt_fraction")

    model, _ = extend_model(twin, 0 if known else 1, len(new_sessions))
    bs = batch_size or cfg.train.batch_size
    before = heldout_scores(model, w_held, cfg, bs)
    params = _trainable(model, fit_rows(model, meta["subject_map"][sub], [meta["session_map"][k] for k in sessions],
                                        len(meta["session_map"])))
    # Early stopping on the last quarter of the adaptation windows (never on the held-out ones): the twin
    # starts at the tuned population model, and a few minutes of one subject can over-fit it.
    n_check = len(w_adapt) // 4
    w_fit, w_check = (w_adapt[:-n_check], w_adapt[-n_check:]) if n_check else (w_adapt, [])
    losses, best_step = _fit_new_rows(model, params, w_fit, w_check, cfg, bs, steps=steps, lr=lr, seed=seed,
                                      device=twin.device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    after = heldout_scores(model, w_held, cfg, bs)
    report = {"modalities": [m for m in MODALITIES if twin.n_nodes(m) > 0], "subject": sub,
              "subject_index": meta["subject_map"][sub], "kind": "held-out" if known else "new",
              "sessions": sessions, "recordings": [r.key for r in recs],
              "n_adapt_windows": len(w_adapt), "n_heldout_windows": len(w_held), "steps": int(steps), "lr": lr,
              "adapt_fraction": adapt_fraction, "train_loss_first": losses[0] if losses else float("nan"),
              "train_loss_last": losses[-1] if losses else float("nan"), "best_step": best_step,
              "n_check_windows": len(w_check), "before": before, "after": after,
              "improvement": before["forecast_loss"] - after["forecast_loss"]}
    worse = [k for k in ("forecast_loss", *(f"{m}_forecast" for m in MODALITIES)) if after[k] > before[k] + 1e-12]
    if worse:
        report["warning"] = (f"held-out forecast got worse after personalisation ({', '.join(worse)} rose); "
                             f"try fewer --steps, a lower --lr or more adaptation data (--adapt-fraction)")
    meta.setdefault("personalized", {})[sub] = {
        "recordings": [r.key for r in recs],
        "norm_stats": {r.key: stats.per_rec[i].to_dict() for i, r in enumerate(recs)},
        "adapt_spans": [[r.key, s, e] for (i, s, e), r in zip(adapt, recs)],
        "heldout_spans": [[r.key, s, e] for (i, s, e), r in zip(held, recs)],
        "report": {k: v for k, v in report.items() if k not in ("before", "after")} | {
            "before": before, "after": after}}
    return model, meta, report


def summary(report: dict) -> str:
    """One line per score: before -> after."""
    lines = [f"subject {report['subject']} ({report.get('kind', 'new')}): {report['n_adapt_windows']} adaptation / "
             f"{report['n_heldout_windows']} held-out windows, {report['steps']} steps; held-out scores before -> after"]
    mods = [m for m in MODALITIES if report.get("modalities") is None or m in report["modalities"]]
    keys = ["forecast_loss"] + [f"{m}_{k}" for m in mods for k in ("forecast", "r2", "skill_h1")]
    for k in keys:
        b, a = report["before"][k], report["after"][k]
        lines.append(f"  {k:15s} {b: .4f} -> {a: .4f}")
    if report.get("warning"):
        lines.append(f"WARNING: {report['warning']}")
    return "\n".join(lines)
