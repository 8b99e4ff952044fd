"""The Twin API: ask a trained TwinBrain model questions.

    twin = Twin.from_checkpoint("runs/x/best/model.pt")   # data=["--data.bids_root", DIR] if the data moved
    w = twin.windows(subject="03", split="test")[0]      # HeteroData, z-scored with the checkpoint's stats
    f = twin.forecast(w)                                 # {'fmri': [N_f, S], 'eeg': [N_e, S * eeg_stride]}
    p = twin.perturb(w, targets=[0, 5], amplitude=1.0)   # baseline / perturbed / delta for every node
    ec = twin.effective_connectivity(twin.windows(split="test"))   # [N, N], ec[i, j] = effect of j on i
    new, report = twin.personalize(recordings_of_new_subject)
    a = twin.attribute(w, target_node=3)                 # {'fmri': [N_f, T_f], 'eeg': [N_e, T_e]}

Units: every signal is in z-units of its node (the recording's normalisation statistics, stored in the
checkpoint); time axes are explicit (fMRI in TRs of ``tr`` s, EEG in samples at ``eeg_sfreq`` Hz).
Conventions are documented in docs/TWIN.md.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Batch, HeteroData

from twinbrain.schema import MODALITIES, relation_key, samples_per_step
from twinbrain.twin import perturb as _pt
from twinbrain.twin.exports import twin_node_table, write_ec_maps
from twinbrain.twin.loader import load_export, save_export
from twinbrain.twin.personalize import fit_subject, recording_windows

log = logging.getLogger(__name__)
EC_CONVENTION = ("ec[i, j] = mean change of node i's forecast per unit stimulus of node j (row = target, "
                 "column = source; GroundTruth.coupling convention)")


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).numpy()


class Twin:
    """A trained model with its config and data metadata. Build with :meth:`from_checkpoint`.

    ``data`` (optional): a set-up ``DataModule`` for the cohort the config describes (built lazily).
    """

    def __init__(self, model, config, metadata: dict, *, path: Path | None = None, data=None,
                 data_overrides: dict | None = None):
        self.model = model.eval()
        self.cfg, self.meta, self.path, self._data = config, metadata, path, data
        self._data_overrides = dict(data_overrides or {})

    @classmethod
    def from_checkpoint(cls, path, device=None, data: dict | list[str] | None = None) -> "Twin":
        """Strictly load an export (see :func:`twinbrain.twin.loader.load_export`).

        ``data``: where the training cohort is now, as ``{'bids_root': ...}`` or ``['--data.bids_root', DIR]``
        (only location keys, :data:`twinbrain.config.LOCATION_KEYS`); default: the saved config (or the
        cohort recorded in the run). The rebuilt cohort must have the checkpoint's fingerprint."""
        from twinbrain.config import parse_overrides
        from twinbrain.data.source import check_location_overrides
        lm = load_export(path, device)
        if isinstance(data, list):
            data = parse_overrides(data).get("data", {}) if data else {}
        check_location_overrides([f"data.{k}" for k in (data or {})], "twin")
        return cls(lm.model, lm.config, lm.metadata, path=lm.path, data_overrides=data)

    # ------------------------------------------------------------------ geometry
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def forecast_steps(self) -> int:
        """``S``: steps predicted by one forward pass (fMRI TRs; EEG latent steps)."""
        return int(self.cfg.model.forecast_steps)

    @property
    def samples_per_tr(self) -> int:
        return int(self.meta["samples_per_tr"])

    @property
    def tr(self) -> float:
        return float(self.meta["tr"])

    @property
    def eeg_sfreq(self) -> float:
        return self.samples_per_tr / self.tr

    def step_samples(self, modality: str) -> int:
        """Signal samples per forecast step: 1 for fMRI (one TR), ``eeg_stride`` for EEG."""
        return samples_per_step(self.cfg.model)[_check_modality(modality)]

    def sample_period_s(self, modality: str) -> float:
        """Seconds per input sample: ``tr`` for fMRI, ``1 / eeg_sfreq`` for EEG."""
        return self.tr if _check_modality(modality) == "fmri" else 1.0 / self.eeg_sfreq

    def n_nodes(self, modality: str) -> int:
        return int(self.meta["n_fmri_slots" if _check_modality(modality) == "fmri" else "n_eeg_slots"])

    def node_names(self, modality: str) -> list[str]:
        return list(self.meta["region_names" if _check_modality(modality) == "fmri" else "channel_names"])

    def node_index(self, modality: str, targets) -> list[int]:
        """Slots of ``targets``: an int slot, a node name, or a list of them."""
        names = self.node_names(modality)
        if not names:
            raise ValueError(f"this twin has no {modality} nodes (it was trained on a cohort without "
                             f"{modality.upper()}); target the other modality")
        items = targets if isinstance(targets, (list, tuple, np.ndarray, torch.Tensor)) else [targets]
        out = []
        for t in items:
            t = t.item() if hasattr(t, "item") else t
            if isinstance(t, str) and t not in names and t.lstrip("-").isdigit():
                t = int(t)
            if isinstance(t, str):
                if t not in names:
                    raise ValueError(f"unknown {modality} node '{t}'; names are {names[:8]}...")
                out.append(names.index(t))
            elif 0 <= int(t) < len(names):
                out.append(int(t))
            else:
                raise ValueError(f"{modality} node {t} is out of range: slots are 0..{len(names) - 1}")
        if not out:
            raise ValueError("no target node given")
        return out

    # ------------------------------------------------------------------ data
    @property
    def data(self):
        """``DataModule`` of the cohort the checkpoint's config describes (simulated cohorts regenerate
        deterministically from ``sim.seed``); checked against the checkpoint's maps and recordings."""
        if self._data is None:
            from twinbrain.config import with_overrides
            from twinbrain.data.module import DataModule
            from twinbrain.data.source import cohort_config
            cfg = self.cfg
            if self._data_overrides:
                cfg = with_overrides(cfg, {"data": self._data_overrides})
            dm = DataModule(cohort_config(cfg, self.meta, overridden=bool(self._data_overrides))).setup()
            self._check_data(dm)
            self._data = dm
        return self._data

    def _check_data(self, dm) -> None:
        from twinbrain.data.source import verify_fingerprint
        got, want = dm.metadata(), self.meta
        where = self.path or "the checkpoint"
        verify_fingerprint(got, want, where)
        for key in ("n_fmri_slots", "n_eeg_slots", "samples_per_tr", "region_names", "channel_names"):
            if got[key] != want[key]:
                raise ValueError(f"{where}: the data its config describes no longer match the model ({key} "
                                 f"differs); point data.* at the cohort the model was trained on")
        if "recordings" in want and got["recordings"] != want["recordings"]:
            raise ValueError(f"{where}: trained on recordings {want['recordings'][:4]}..., the config now "
                             f"gives {got['recordings'][:4]}...; the cohort changed, windows would be wrong")
        for key in ("subject_map", "session_map"):
            bad = [k for k, v in got[key].items() if want[key].get(k) != v]
            if bad:
                raise ValueError(f"{where}: {key} entries {bad[:4]} differ from the checkpoint's")
        if "norm_stats" in want and got["norm_stats"] != want["norm_stats"]:
            log.warning("%s: normalisation statistics recomputed from the data differ from the saved ones "
                        "(regenerated or re-prepared data?); using the checkpoint's", where)

    def windows(self, subject: str | None = None, split: str = "test", *, limit: int = 0,
                ids=None) -> "WindowList":
        """Windows of ``split`` ('train' | 'val' | 'test' | 'all') of the cohort, optionally of one
        ``subject``, z-scored with the checkpoint's statistics, in dataset order (recording, start).

        Built lazily: the result is a sequence whose items are made when read, so asking for 128 windows
        of a large split costs 128 windows. ``limit``: keep the first ``limit`` (0 = all); ``ids``: keep
        these indices (into the split's windows, in the given order)."""
        from twinbrain.data.windows import NormStats, WindowDataset
        dm = self.data
        saved = self.meta.get("split")
        names = ("train", "val", "test") if split == "all" else (split,)
        if any(n not in ("train", "val", "test") for n in names):
            raise ValueError(f"unknown split '{split}'; use train, val, test or all")
        spans = [tuple(s) for n in names for s in (saved[n] if saved else dm.split.spans(n))]
        spans = [(int(i), float(s), float(e)) for i, s, e in spans]
        recs = dm.cohort.recordings
        if subject is not None:
            spans = [sp for sp in spans if recs[sp[0]].subject == str(subject)]
            if not spans:
                raise ValueError(f"subject '{subject}' has no window in split '{split}' (subjects per split: "
                                 f"{dm.split.subjects}); for a subject outside the cohort use windows_from()")
        stats = NormStats.from_dict(self.meta["norm_stats"]) if "norm_stats" in self.meta else dm.stats
        ds = WindowDataset(dm.cohort, spans, dm.graphs, stats, self.meta["subject_map"], self.meta["session_map"],
                           window_s=self.cfg.data.window_s, stride_s=self.cfg.data.stride_s)
        return WindowList(ds, select_windows(len(ds), limit=limit, ids=ids, what=f"split '{split}'"))

    def windows_from(self, recordings, spans=None) -> list[HeteroData]:
        """Windows of recordings outside the training cohort (e.g. a personalised subject). Statistics come
        from the subject's personalisation record if there is one, else from each recording's own span."""
        return recording_windows(self, recordings, spans)

    # ------------------------------------------------------------------ batches
    def check_slots(self, batch) -> None:
        """Every window must hold all atlas slots in slot order (as ``WindowDataset`` builds them)."""
        b = batch.subject.numel()
        for m in MODALITIES:
            n = self.n_nodes(m)
            ids = batch[m].node_id if "node_id" in batch[m] else None
            if batch[m].x.shape[0] != b * n or (ids is not None and not torch.equal(
                    ids.cpu(), torch.arange(n).repeat(b))):
                raise ValueError(f"{m}: the twin needs every window to hold all {n} slots in slot order "
                                 f"(node_id 0..{n - 1}), as WindowDataset builds them; mask missing slots")

    def batch(self, windows) -> tuple[Batch, bool]:
        """HeteroData | list[HeteroData] | Batch -> (Batch on the model's device, was_single_window)."""
        single = isinstance(windows, HeteroData) and not isinstance(windows, Batch)
        if isinstance(windows, Batch):
            batch = windows
        elif single:
            batch = Batch.from_data_list([windows])
        else:
            batch = Batch.from_data_list(list(windows))
        batch = batch.to(self.device)
        self.check_slots(batch)
        return batch, single

    def _shape(self, x: torch.Tensor, n_win: int, single: bool, m: str) -> np.ndarray:
        out = _np(x).reshape(n_win, self.n_nodes(m), x.shape[-1])     # x: [B * N, F]; N may be 0
        return out[0] if single else out

    def predict(self, batch, steps: int, need=MODALITIES) -> dict[str, torch.Tensor]:
        """Differentiable forecasts ``{m: [B * N, steps * step]}`` (roll-out beyond ``S``; see
        :func:`twinbrain.twin.perturb.predict`)."""
        return _pt.predict(self.model, batch, steps, spt=self.samples_per_tr, stride=self.step_samples("eeg"),
                           need=need)

    # ------------------------------------------------------------------ questions
    @torch.no_grad()
    def forecast(self, windows, steps: int | None = None) -> dict:
        """Forecast the ``steps`` (<= ``S``) steps after the whole given context window.

        Returns ``{'fmri': [N_f, steps] (TRs), 'eeg': [N_e, steps * eeg_stride] (samples)}`` in z-units,
        plus ``'fmri_std'``, ``'eeg_std'`` for a Gaussian head; a leading ``[B]`` axis for several windows.
        Step ``k`` starts ``k`` TRs (fMRI) / ``k * eeg_stride`` samples (EEG) after the context end.
        """
        steps = self.forecast_steps if steps is None else int(steps)
        if not 1 <= steps <= self.forecast_steps:
            raise ValueError(f"steps={steps}: the model forecasts 1..{self.forecast_steps} steps per pass "
                             f"(model.forecast_steps); for longer horizons use Twin.rollout(window, steps) "
                             f"or perturb(..., num_steps=...), which feed forecasts back as inputs")
        return self.rollout(windows, steps)

    @torch.no_grad()
    def rollout(self, windows, steps: int) -> dict:
        """Like :meth:`forecast` for any ``steps``: beyond ``S`` forecasts are fed back autoregressively
        (no ``*_std`` then)."""
        batch, single = self.batch(windows)
        pred = self.predict(batch, int(steps))
        n_win = batch.subject.numel()
        res = {k: self._shape(v, n_win, single, k.split("_")[0]) for k, v in pred.items()}
        res.update(steps=int(steps), tr=self.tr, eeg_sfreq=self.eeg_sfreq, units="z")
        return res

    @torch.no_grad()
    def perturb(self, window, targets, amplitude: float = 1.0, duration_steps: int = 1, onset: int | None = None,
                modality: str = "fmri", num_steps: int | None = None) -> dict:
        """Virtual stimulation: add ``amplitude`` (z-units) to the input of ``targets`` (slots or names of
        ``modality``) over input steps ``[onset, onset + duration_steps)`` of the context (fMRI: TRs, EEG:
        samples; default onset ``T - duration_steps``, i.e. the pulse ends on the last context step).

        Returns ``{'baseline' | 'perturbed' | 'delta': {'fmri': [N_f, num_steps], 'eeg': [N_e, num_steps *
        eeg_stride]}, ...}`` for every node (leading ``[B]`` for several windows). ``num_steps`` (default
        ``S``) counts forecast steps of each modality; beyond ``S`` both runs are rolled out by feeding
        their own forecasts back as inputs (:func:`twinbrain.twin.perturb.predict`).
        """
        modality = _check_modality(modality)
        steps = self.forecast_steps if num_steps is None else int(num_steps)
        batch, single = self.batch(window)
        slots = self.node_index(modality, targets)
        n_win, n = batch.subject.numel(), self.n_nodes(modality)
        t_len = batch[modality].x.shape[1]
        start = t_len - duration_steps if onset is None else int(onset)
        copies = torch.arange(n_win).repeat_interleave(len(slots))
        stim = _pt.stimulate(batch, modality, n, copies, torch.tensor(slots * n_win), amplitude, start,
                             duration_steps)
        base, pert = self.predict(batch, steps), self.predict(stim, steps)
        out = {"baseline": {}, "perturbed": {}, "delta": {}}
        for m in MODALITIES:
            out["baseline"][m] = self._shape(base[m], n_win, single, m)
            out["perturbed"][m] = self._shape(pert[m], n_win, single, m)
            out["delta"][m] = out["perturbed"][m] - out["baseline"][m]
        period = self.sample_period_s(modality)
        out.update(targets=slots, target_names=[self.node_names(modality)[s] for s in slots], modality=modality,
                   amplitude=float(amplitude), onset=start, duration_steps=int(duration_steps), num_steps=steps,
                   rollout=steps > self.forecast_steps, onset_s=(start - t_len) * period, tr=self.tr,
                   eeg_sfreq=self.eeg_sfreq, units="z")
        return out

    def effective_connectivity(self, windows=None, modality: str = "fmri", amplitude: float = 1.0,
                               signed: bool = True, horizon: int = 1, onset: int | None = None,
                               duration_steps: int = 1, batch_size: int = 64, method: str = "perturbation",
                               subject: str | None = None) -> np.ndarray:
        """``[N, N]`` matrix, row = target ``i``, column = source ``j`` (rows/columns follow :meth:`node_names`):

        * ``perturbation``: mean forecast change of ``i`` per unit stimulus of ``j`` (averaged over ``windows``
          and forecast steps ``1..horizon``; batched, :func:`twinbrain.twin.perturb.effective_connectivity`);
        * ``jacobian``: the same derivative by forward-mode autodiff at the last context step (or ``onset``)
          — equal to ``perturbation`` at small amplitude (:func:`twinbrain.twin.perturb.jacobian_ec`);
        * ``coupling``: the learned latent coupling ``C`` of the ``(modality, fc, modality)`` relation
          (population, or ``subject``'s own with its low-rank delta; no windows needed; latent units);
        * ``linear``: the linear core's matrix (fMRI only; signal z-units): the lag-1 matrix of the VAR core
          (gain per TR), or ``W`` of the transfer-flow core (``model.core`` transfer / auto when it chose
          the flow: ``dx/dt = c - D x + W tanh(b x)``, per TR per unit of ``tanh(b x_j)``; no indirect paths).
        ``|ec|`` if ``signed=False``."""
        modality = _check_modality(modality)
        if method in ("coupling", "linear"):
            ec = self._learned_matrix(modality, method, subject)
            return ec if signed else np.abs(ec)
        if method not in ("perturbation", "jacobian"):
            raise ValueError(f"method '{method}' is not one of perturbation, jacobian, coupling, linear")
        if windows is None:
            raise ValueError(f"method '{method}' needs windows (e.g. twin.windows(split='test'))")
        ws = [windows] if isinstance(windows, HeteroData) and not isinstance(windows, Batch) else \
            (windows.to_data_list() if isinstance(windows, Batch) else list(windows))
        if not ws:
            raise ValueError("effective_connectivity needs at least one window")
        if method == "jacobian":
            ec = _pt.jacobian_ec(self, ws, modality, int(horizon), onset, int(batch_size))
            return ec if signed else np.abs(ec)
        return _pt.effective_connectivity(self, ws, modality, amplitude, signed, int(horizon),
                                          onset, int(duration_steps), int(batch_size))

    def _learned_matrix(self, modality: str, method: str, subject: str | None) -> np.ndarray:
        model = self.model
        if method == "linear":
            if modality not in model.linear:
                raise ValueError(f"the model has no linear core for {modality} (model.linear_order = "
                                 f"{model.cfg.linear_order}); use method perturbation or jacobian")
        part = model.linear[modality].matrix if method == "linear" else \
            model.coupling[relation_key((modality, "fc", modality))].matrix
        if subject is None:
            return _np(part())
        if str(subject) not in self.meta["subject_map"]:
            raise ValueError(f"subject '{subject}' is not in the model (subjects: {list(self.meta['subject_map'])})")
        return _np(part(torch.tensor([self.meta["subject_map"][str(subject)]], device=self.device))[0])

    def save_ec(self, ec: np.ndarray, path, modality: str = "fmri", **info) -> tuple[Path, Path]:
        """Write ``ec [N, N]`` to ``path`` (.npy) and, beside it (.json), the node names (row i / column j
        order), the sign convention and ``info`` (amplitude, horizon, ...). Returns both paths."""
        path = Path(path).with_suffix(".npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.asarray(ec))
        meta = {"modality": modality, "names": self.node_names(modality), "shape": list(np.shape(ec)),
                "convention": EC_CONVENTION, "units": "forecast z-units per stimulus z-unit", **info,
                **twin_node_table(self, modality)}
        side = path.with_suffix(".json")
        side.write_text(json.dumps(meta, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
        if modality == "fmri":
            write_ec_maps(self, ec, path.parent)
        return path, side

    def attribute(self, window, target_node, modality: str = "fmri", horizon: int = 1,
                  method: str = "grad_x_input", steps: int = 32, at_step: int | None = None) -> dict:
        """Attribution of one forecast to every input node and time; see :mod:`twinbrain.twin.attribution`."""
        from twinbrain.twin.attribution import attribute
        return attribute(self, window, target_node, _check_modality(modality), int(horizon), method, int(steps),
                         at_step)

    def personalize(self, data, **kwargs):
        """Few-shot personalisation to a new or held-out subject -> ``(Twin, report)``: the new Twin shares
        this one's config and data; keywords and report as :func:`twinbrain.twin.personalize.fit_subject`."""
        model, meta, report = fit_subject(self, data, **kwargs)
        return Twin(model, self.cfg, meta, path=None, data=self._data), report

    def save(self, path) -> Path:
        """Write this twin in the export format (loadable by :meth:`from_checkpoint`)."""
        return save_export(path, self.model, self.cfg, self.meta)

    def truth(self):
        """The cohort's ``GroundTruth`` (simulated data) or None."""
        return self.data.truth

    def modules(self) -> np.ndarray | None:
        """``[N_f]`` network label per region if the data know it (simulator / atlas), else None."""
        rec = self.data.cohort.recordings[0]
        if rec.modules is not None:
            return np.asarray(rec.modules)
        truth = self.data.truth
        return None if truth is None else np.asarray(truth.modules)


def select_windows(n: int, *, limit: int = 0, ids=None, what: str = "the selection") -> list[int]:
    """Indices ``0..n-1`` restricted to ``ids`` (in that order) and then to the first ``limit``."""
    idx = list(range(n))
    if ids is not None and len(ids):
        bad = [int(i) for i in ids if not 0 <= int(i) < n]
        if bad:
            raise ValueError(f"window ids {bad} are out of range: {what} has {n} windows (0..{n - 1})")
        idx = [int(i) for i in ids]
    if limit and limit > 0:
        idx = idx[:int(limit)]
    return idx


class WindowList(Sequence):
    """A lazy sequence of windows: item ``k`` is ``dataset[index[k]]``, built when read; slicing gives a
    lazy sub-list. ``list(w)`` materialises it."""

    def __init__(self, dataset, index: list[int]):
        self.dataset, self.index = dataset, list(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return WindowList(self.dataset, self.index[k])
        return self.dataset[self.index[k]]

    def __repr__(self) -> str:
        return f"WindowList({len(self)} windows)"


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"modality '{modality}' is not one of {MODALITIES}")
    return modality
