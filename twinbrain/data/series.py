"""Normalised continuous series of a split's spans, for closed-form fits (baselines, the linear core)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from twinbrain.data.graph import load_structural
from twinbrain.data.mapped import release
from twinbrain.data.timing import channel_mask, eeg_span, span_volumes


class SpanSeries(Sequence):
    """Lazy list of the normalised series of some spans: item ``k`` is computed when asked for (and the
    mapped pages it read are released), so one pass over a cohort holds one series at a time. Items are
    recomputed on every access; ``list(series)`` materialises them all."""

    def __init__(self, cohort, stats, spans, modality: str):
        self.cohort, self.stats, self.spans, self.modality = cohort, stats, list(spans), modality

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        i, s, e = self.spans[k]
        rec, st = self.cohort.recordings[i], self.stats.per_rec[i]
        v0, v1 = span_volumes(rec, s, e)
        if self.modality == "fmri":
            x, mean, std, mask = rec.fmri[:, v0:v1], st.fmri_mean, st.fmri_std, np.asarray(rec.region_mask, bool)
        else:
            s0, s1 = eeg_span(rec, v0, v1)
            x, mean, std, mask = rec.eeg[:, s0:s1], st.eeg_mean, st.eeg_std, channel_mask(rec)
        z = (np.asarray(x, np.float64) - mean[:, None]) / std[:, None]
        z[~mask] = 0.0
        release(x)
        return z


def span_series(cohort, stats, spans, modality: str) -> SpanSeries:
    """One float64 ``[N, T]`` per span ``(rec_index, start_s, end_s)``, in TRs (fMRI) or EEG samples,
    z-scored with that recording's statistics (``stats.per_rec``) exactly as the windows are; missing
    slots are 0. A lazy :class:`SpanSeries` (a ``Sequence``): iterating it streams the cohort."""
    return SpanSeries(cohort, stats, spans, modality)


def mean_abs_correlation(series: list[np.ndarray]) -> np.ndarray:
    """``[N, N]`` mean over series of ``|corr|`` (0 for constant or missing slots, 0 on the diagonal)."""
    n = series[0].shape[0]
    acc, count = np.zeros((n, n)), 0
    for x in series:
        if x.shape[1] < 3:
            continue
        xc = x - x.mean(1, keepdims=True)
        sd = np.sqrt((xc ** 2).sum(1))
        sd[sd == 0] = np.inf
        acc += np.abs((xc @ xc.T) / np.outer(sd, sd))
        count += 1
    out = acc / max(count, 1)
    np.fill_diagonal(out, 0.0)
    return out


def coupling_prior(kind: str, series, modality: str, structural: str = "") -> np.ndarray | None:
    """The prior ``[N, N]`` in [0, 1] (row = target, column = source) of one modality's couplings that
    ``model.coupling_prior`` names: ``fc`` = :func:`mean_abs_correlation` of the training ``series``;
    ``structural`` = the ``graph.structural`` matrix (scaled to max 1) for fMRI, fc for EEG; ``none`` = None.
    It weights the coupling's sparsity penalty and the linear core's cross-node ridge penalty."""
    if kind == "none":
        return None
    if kind == "structural" and modality == "fmri":
        return load_structural(structural, series[0].shape[0])
    return mean_abs_correlation(series)
