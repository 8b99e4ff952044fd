"""Splits, normalisation statistics, the window index and ``WindowDataset`` (one window = one HeteroData).

Spans are ``(rec_index, start_s, end_s)`` on the fMRI clock of that recording (see ``timing.py``).
A window starting at volume ``v`` covers ``[v * tr, (v + T_f) * tr)`` s: fMRI volumes ``v .. v + T_f - 1``
and ``T_e = T_f * samples_per_tr`` EEG samples from ``eeg_index(v * tr)``; EEG sample ``k`` of the window
lies in fMRI volume ``k // samples_per_tr`` of the window.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from twinbrain.config import Config
from twinbrain.data.mapped import ResidentCache, read_columns, release_recording
from twinbrain.data.timing import (channel_mask, common_span, eeg_index, eeg_span, samples_per_tr,
                                   span_volumes, volumes)
from twinbrain.data.types import Cohort, Recording
from twinbrain.schema import MODALITIES

Span = tuple[int, float, float]  # (rec_index, start_s, end_s)


# ------------------------------------------------------------------ splits

@dataclass
class Split:
    """Window spans per split. ``calib``: held-out rec -> ``(start_s, end_s)`` used only for normalisation
    statistics (and a run-scope graph), never for windows. ``subjects``: split -> subject ids."""
    train: list[Span]
    val: list[Span]
    test: list[Span]
    calib: dict[int, tuple[float, float]] = field(default_factory=dict)
    subjects: dict[str, list[str]] = field(default_factory=dict)

    def spans(self, name: str) -> list[Span]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split '{name}'; use train, val or test")
        return getattr(self, name)

    def to_dict(self) -> dict:
        return {"train": [list(s) for s in self.train], "val": [list(s) for s in self.val],
                "test": [list(s) for s in self.test], "calib": {str(k): list(v) for k, v in self.calib.items()},
                "subjects": self.subjects}


def split_recordings(cohort: Cohort, cfg: Config) -> Split:
    """Split recordings into train/val/test spans (``cfg.data.split``).

    'subject': whole held-out subjects (``data.test_subjects``, then ``data.val_subjects``) taken from a
    permutation of the sorted subject list seeded by ``train.seed``, or named explicitly by
    ``data.test_subject_ids`` / ``data.val_subject_ids`` (leave-one-subject-out folds); a subject's runs
    never straddle splits.
    With ``data.calib_s > 0`` the first ``calib_s`` s of every held-out run are reserved for normalisation.
    'chronological': every run is cut into train | gap | val | gap | test by the tail fractions
    (``data.val_fraction``, ``data.test_fraction``); each gap is one window long, so windows of different
    splits never overlap and are at least one window apart.
    Raises ValueError if the training split, or a requested (non-zero) held-out split, has no window.
    """
    d = cfg.data
    recs = cohort.recordings
    train, val, test, calib = [], [], [], {}
    if d.split == "subject":
        subjects = sorted({r.subject for r in recs})
        for key, ids in (("data.test_subject_ids", d.test_subject_ids), ("data.val_subject_ids", d.val_subject_ids)):
            unknown = sorted(set(ids) - set(subjects))
            if unknown:
                raise ValueError(f"{key}: {unknown} are not subjects of this cohort ({', '.join(subjects)})")
        named = set(d.test_subject_ids) | set(d.val_subject_ids)
        rest = [s for s in subjects if s not in named]
        order = [rest[i] for i in np.random.default_rng(cfg.train.seed).permutation(len(rest))]
        # Explicit ids replace the count of their split; the other split is drawn from the rest.
        test_subj = sorted(d.test_subject_ids) if d.test_subject_ids else order[:d.test_subjects]
        order = [s for s in order if s not in test_subj]
        val_subj = sorted(d.val_subject_ids) if d.val_subject_ids else order[:d.val_subjects]
        train_subj = [s for s in order if s not in val_subj]
        if not train_subj:
            raise ValueError(f"{len(val_subj)} validation + {len(test_subj)} test subjects leave no training "
                             f"subject out of {len(subjects)} ({', '.join(subjects)}); hold out fewer "
                             f"(data.val_subjects, data.test_subjects, data.*_subject_ids)")
        groups = {"test": test_subj, "val": val_subj, "train": train_subj}
        where = {s: name for name, subs in groups.items() for s in subs}
        for i, rec in enumerate(recs):
            start, end = common_span(rec)
            name = where[rec.subject]
            if name != "train" and d.calib_s > 0:
                calib[i] = (start, start + d.calib_s)
                start += d.calib_s
            {"train": train, "val": val, "test": test}[name].append((i, start, end))
        subj = {k: sorted(v) for k, v in groups.items()}
    else:
        for i, rec in enumerate(recs):
            start, end = common_span(rec)
            dur = end - start
            b1 = start + dur * (1.0 - d.val_fraction - d.test_fraction)
            b2 = start + dur * (1.0 - d.test_fraction)
            train.append((i, start, b1))
            if d.val_fraction > 0:
                val.append((i, b1 + d.window_s, b2))
            if d.test_fraction > 0:
                test.append((i, b2 + d.window_s, end))
        all_subjects = sorted({r.subject for r in recs})
        subj = {"train": all_subjects, "val": all_subjects if val else [], "test": all_subjects if test else []}
    split = Split(train, val, test, calib, subj)
    wanted = {"train": True,
              "val": (len(subj["val"]) if d.split == "subject" else d.val_fraction) > 0,
              "test": (len(subj["test"]) if d.split == "subject" else d.test_fraction) > 0}
    for name, need in wanted.items():
        spans = split.spans(name)
        if need and sum(len(window_starts(recs[i], (s, e), d.window_s, d.stride_s)) for i, s, e in spans) == 0:
            raise ValueError(f"split '{name}' ({d.split}) has no window of data.window_s={d.window_s} s "
                             f"(spans: {[(recs[i].key, round(s, 2), round(e, 2)) for i, s, e in spans]}); "
                             f"use shorter windows, longer runs, a smaller data.calib_s or different split sizes")
    return split


# ------------------------------------------------------------------ normalisation

@dataclass
class RecStats:
    """z-scoring statistics: ``fmri_mean/std`` ``[R]``, ``eeg_mean/std`` ``[C]`` (data units); ``source`` says
    where they came from: 'train-span', 'calib' or 'group'."""
    fmri_mean: np.ndarray
    fmri_std: np.ndarray
    eeg_mean: np.ndarray
    eeg_std: np.ndarray
    source: str

    def to_dict(self) -> dict:
        return {"fmri_mean": self.fmri_mean.tolist(), "fmri_std": self.fmri_std.tolist(),
                "eeg_mean": self.eeg_mean.tolist(), "eeg_std": self.eeg_std.tolist(), "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "RecStats":
        return cls(*(np.asarray(d[k], np.float64) for k in ("fmri_mean", "fmri_std", "eeg_mean", "eeg_std")),
                   d["source"])


@dataclass
class NormStats:
    """Per-recording stats (``per_rec[rec_index]``) and the training subjects' group stats per slot."""
    per_rec: dict[int, RecStats]
    group: RecStats

    def to_dict(self) -> dict:
        return {"group": self.group.to_dict(), "per_rec": {str(k): v.to_dict() for k, v in self.per_rec.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "NormStats":
        return cls({int(k): RecStats.from_dict(v) for k, v in d["per_rec"].items()}, RecStats.from_dict(d["group"]))


def _moments(x: np.ndarray) -> np.ndarray:
    """``[N, T]`` -> ``[3, N]``: count, sum, sum of squares (float64) so spans and recordings can be pooled."""
    x = np.asarray(x, dtype=np.float64)
    return np.stack([np.full(x.shape[0], x.shape[1], np.float64), x.sum(1), (x * x).sum(1)])


def _finish(m: np.ndarray, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    n = np.maximum(m[0], 1.0)
    mean = m[1] / n
    var = np.maximum(m[2] / n - mean ** 2, 0.0)
    std = np.sqrt(var)
    # Constant or missing slots: std 1 keeps them at 0 instead of dividing by ~0.
    bad = (m[0] < 2) | (std <= 1e-12 * max(1.0, float(np.abs(mean).max(initial=0.0))))
    if present is not None:
        bad |= ~present
    return np.where(m[0] < 1, 0.0, mean), np.where(bad, 1.0, std)


def span_moments(rec: Recording, start_s: float, end_s: float) -> tuple[np.ndarray, np.ndarray]:
    """fMRI ``[3, R]`` and EEG ``[3, C]`` moments of the data inside ``[start_s, end_s)``."""
    v0, v1 = span_volumes(rec, start_s, end_s)
    s0, s1 = eeg_span(rec, v0, v1)
    return _moments(rec.fmri[:, v0:v1]), _moments(rec.eeg[:, s0:s1])


def compute_norm_stats(cohort: Cohort, split: Split) -> NormStats:
    """z-scoring statistics that never see evaluated data.

    Training recordings: their training span(s). Held-out recordings: their calibration span
    (``split.calib``) if any, else the training recordings' pooled statistics per slot ('group';
    node identity is fixed, so slot i is the same region in every subject).
    """
    recs = cohort.recordings
    train_m: dict[int, list] = {}
    for i, s, e in split.train:
        fm, em = span_moments(recs[i], s, e)
        release_recording(recs[i])                # a mapped cohort streams through in O(one recording)
        prev = train_m.get(i)
        train_m[i] = [fm, em] if prev is None else [prev[0] + fm, prev[1] + em]
    per_rec: dict[int, RecStats] = {}
    g_f, g_e, p_f, p_e = 0.0, 0.0, 0.0, 0.0
    for i, (fm, em) in train_m.items():
        fmask, emask = np.asarray(recs[i].region_mask, bool), channel_mask(recs[i])
        per_rec[i] = RecStats(*_finish(fm, fmask), *_finish(em, emask), "train-span")
        g_f = g_f + fm * fmask  # pool only slots with data
        g_e = g_e + em * emask
        p_f, p_e = p_f + fmask, p_e + emask
    if not train_m:
        raise ValueError("no training span: cannot compute normalisation statistics")
    group = RecStats(*_finish(g_f, p_f > 0), *_finish(g_e, p_e > 0), "group")
    held = {i for name in ("val", "test") for i, _, _ in split.spans(name)} - set(per_rec)
    for i in sorted(held):
        if i in split.calib:
            fm, em = span_moments(recs[i], *split.calib[i])
            release_recording(recs[i])
            per_rec[i] = RecStats(*_finish(fm, np.asarray(recs[i].region_mask, bool)),
                                  *_finish(em, channel_mask(recs[i])), "calib")
        else:
            per_rec[i] = group
    return NormStats(per_rec, group)


# ------------------------------------------------------------------ window index

def window_starts(rec: Recording, span: tuple[float, float], window_s: float, stride_s: float) -> np.ndarray:
    """First fMRI volume of every window inside ``span`` (s): ``[W]`` int64, every ``stride_s`` s."""
    t_f = volumes(window_s, rec.tr, f"{rec.key}: data.window_s")
    stride = volumes(stride_s, rec.tr, f"{rec.key}: data.stride_s")
    v0, v1 = span_volumes(rec, *span)
    return np.arange(v0, v1 - t_f + 1, stride, dtype=np.int64)


def build_maps(cohort: Cohort) -> tuple[dict[str, int], dict[str, int]]:
    """``subject_map`` (sorted subject ids -> index) and ``session_map`` ("sub/ses" -> index) from ALL
    recordings, so indices are stable whatever the split."""
    subs = sorted({r.subject for r in cohort.recordings})
    sess = sorted({f"{r.subject}/{r.session}" for r in cohort.recordings})
    return {s: i for i, s in enumerate(subs)}, {s: i for i, s in enumerate(sess)}


class WindowDataset:
    """Time-aligned EEG+fMRI windows of a set of spans -> ``HeteroData`` (schema in docs/ARCHITECTURE.md).

    Args:
        cohort: the recordings. spans: ``[(rec_index, start_s, end_s)]``.
        graphs: one ``GraphEdges`` for every window (group scope) or ``{rec_index: GraphEdges}`` (run scope).
        stats: ``NormStats``; every recording in ``spans`` needs ``stats.per_rec[rec_index]``.
        subject_map / session_map: from :func:`build_maps`.
        window_s / stride_s: window span and step (s; whole numbers of TRs).
        cache_mb: MiB of memory-mapped recordings this dataset may hold whole in memory per process
            (:class:`~twinbrain.data.mapped.ResidentCache`; other windows are read alone from the store;
            in-memory cohorts ignore it). cache_evict: the cache drops its least recently used recording
            for a new one (with ``data.shuffle_block``, whose sampler reads few recordings at a time).
    Windows are z-scored on the fly (x == y, clean; augmentation happens in collate).
    """

    def __init__(self, cohort: Cohort, spans: list[Span], graphs, stats: NormStats,
                 subject_map: dict[str, int], session_map: dict[str, int], *, window_s: float, stride_s: float,
                 cache_mb: float = 0, cache_evict: bool = False):
        self.cohort, self.spans, self.graphs, self.stats = cohort, list(spans), graphs, stats
        self.subject_map, self.session_map = subject_map, session_map
        self.window_s, self.stride_s = window_s, stride_s
        recs = cohort.recordings
        rows = []
        for i, s, e in self.spans:
            rec = recs[i]
            spt = samples_per_tr(rec)
            t_f = volumes(window_s, rec.tr, f"{rec.key}: data.window_s")
            starts = window_starts(rec, (s, e), window_s, stride_s)
            if starts.size:
                # Fail at build time, not mid-training, if EEG does not cover a window's fMRI span.
                s0 = eeg_index(rec, starts * rec.tr)
                bad = (s0 < 0) | (s0 + t_f * spt > rec.eeg.shape[1])
                if bad.any():
                    v = int(starts[np.argmax(bad)])
                    raise ValueError(f"{rec.key}: EEG ({rec.eeg.shape[1]} samples from {rec.eeg_onset_s} s) does not "
                                     f"cover the window at volumes {v}..{v + t_f - 1} "
                                     f"({v * rec.tr:.2f}-{(v + t_f) * rec.tr:.2f} s); trim the span to common_span()")
            rows.append(np.stack([np.full(starts.size, i, np.int64), starts], axis=1))
            if i not in stats.per_rec:
                raise ValueError(f"{rec.key}: no normalisation statistics for recording {i}")
            if isinstance(graphs, dict) and i not in graphs:
                raise ValueError(f"{rec.key}: no graph for recording {i} (run scope)")
        self.index = np.concatenate(rows) if rows else np.zeros((0, 2), np.int64)   # [W, 2] (rec, start volume)
        self._torch_cache: dict = {}
        self._affine_cache: dict = {}
        self.cache = ResidentCache(int(cache_mb * 2 ** 20), evict=cache_evict)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def sizes(self) -> np.ndarray:
        """``[W]`` node count (fMRI + EEG slots) per window, e.g. for bucketing."""
        recs = self.cohort.recordings
        per = {i: recs[i].fmri.shape[0] + recs[i].eeg.shape[0] for i in np.unique(self.index[:, 0])}
        return np.array([per[i] for i in self.index[:, 0]], dtype=np.int64)

    def graph_for(self, rec_index: int):
        return self.graphs[rec_index] if isinstance(self.graphs, dict) else self.graphs

    def window_arrays(self, i: int) -> dict:
        """Raw normalised numpy window (for baselines): ``fmri`` ``[R, T_f]``, ``eeg`` ``[C, T_e]`` float32,
        ``fmri_mask`` ``[R]``, ``eeg_mask`` ``[C]``, and ``rec``, ``start`` (volume), ``subject``, ``session``."""
        r, v = (int(a) for a in self.index[i])
        rec = self.cohort.recordings[r]
        t_f = volumes(self.window_s, rec.tr, "data.window_s")
        t_e = t_f * samples_per_tr(rec)
        s0 = eeg_index(rec, v * rec.tr)
        (f_shift, f_scale, fmask), (e_shift, e_scale, emask) = self._affine(r)
        held = self.cache.get(r, rec)             # in memory, or None: read this window alone from the store
        f_raw = held[0][:, v:v + t_f] if held else read_columns(rec.fmri, v, v + t_f)
        e_raw = held[1][:, s0:s0 + t_e] if held else read_columns(rec.eeg, s0, s0 + t_e)
        f_raw, e_raw = (x.astype(np.float32) if x.dtype == np.float16 else x for x in (f_raw, e_raw))  # exact
        fmri = (f_raw - f_shift) * f_scale        # float32; missing slots come out exactly 0
        eeg = (e_raw - e_shift) * e_scale
        return {"fmri": fmri.astype(np.float32, copy=False), "eeg": eeg.astype(np.float32, copy=False),
                "fmri_mask": fmask.copy(),
                "eeg_mask": emask.copy(), "rec": r, "start": v,
                "subject": self.subject_map[rec.subject], "session": self.session_map[f"{rec.subject}/{rec.session}"]}

    def _affine(self, r: int):
        """Per recording and modality: (shift ``[N, 1]``, scale ``[N, 1]`` float32, mask ``[N]``); scale is
        ``1 / std`` on present slots and 0 on missing ones, so z-scoring is one subtract and one multiply."""
        if r not in self._affine_cache:
            rec, st = self.cohort.recordings[r], self.stats.per_rec[r]
            out = []
            for mean, std, mask in ((st.fmri_mean, st.fmri_std, np.asarray(rec.region_mask, bool)),
                                    (st.eeg_mean, st.eeg_std, channel_mask(rec))):
                scale = np.where(mask, 1.0 / std, 0.0).astype(np.float32)[:, None]
                out.append((mean.astype(np.float32)[:, None], scale, mask))
            self._affine_cache[r] = tuple(out)
        return self._affine_cache[r]

    def _static(self, r: int) -> dict:
        """Per-recording tensors shared by all its windows (node ids, masks, positions, edges)."""
        if r not in self._torch_cache:
            import torch
            rec = self.cohort.recordings[r]
            g = self.graph_for(r)
            if (g.n_fmri, g.n_eeg) != (rec.fmri.shape[0], rec.eeg.shape[0]):
                raise ValueError(f"{rec.key}: graph has {g.n_fmri} fMRI x {g.n_eeg} EEG nodes, recording has "
                                 f"{rec.fmri.shape[0]} x {rec.eeg.shape[0]}")
            self._torch_cache[r] = {
                "fmri_pos": torch.as_tensor(rec.region_pos, dtype=torch.float32),
                "eeg_pos": torch.as_tensor(rec.channel_pos, dtype=torch.float32),
                "fmri_id": torch.arange(rec.fmri.shape[0], dtype=torch.long),
                "eeg_id": torch.arange(rec.eeg.shape[0], dtype=torch.long),
                "edges": {key: g.torch(key) for key in g.edge_index},
            }
        return self._torch_cache[r]

    def __getitem__(self, i: int):
        import torch
        from torch_geometric.data import HeteroData
        a = self.window_arrays(i)
        st = self._static(a["rec"])
        data = HeteroData()
        for m in MODALITIES:
            y = torch.from_numpy(a[m]).unsqueeze(-1)                     # [N, T, 1]
            data[m].x = y.clone()                                        # separate storage: x may be augmented
            data[m].y = y
            data[m].mask = torch.from_numpy(a[f"{m}_mask"].copy())
            data[m].node_id = st[f"{m}_id"]
            data[m].pos = st[f"{m}_pos"]
        for key, (ei, ew) in st["edges"].items():
            data[key].edge_index = ei
            data[key].edge_weight = ew
        for name in ("subject", "session", "rec", "start"):
            data[name] = torch.tensor([a[name]], dtype=torch.long)
        return data
