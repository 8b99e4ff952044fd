"""Normalised continuous series of a split's spans, for closed-form fits (baselines, the linear core)."""
from __future__ import annotations

import numpy as np

from twinbrain.data.timing import channel_mask, eeg_span, span_volumes


def span_series(cohort, stats, spans, modality: str) -> list[np.ndarray]:
    """One float64 ``[N, T]`` per span ``(rec_index, start_s, end_s)``, in TRs (fMRI) or EEG samples,
    z-scored with that recording's statistics (``stats.per_rec``) exactly as the windows are; missing
    slots are 0."""
    out = []
    for i, s, e in spans:
        rec, st = cohort.recordings[i], stats.per_rec[i]
        v0, v1 = span_volumes(rec, s, e)
        if modality == "fmri":
            x, mean, std, mask = rec.fmri[:, v0:v1], st.fmri_mean, st.fmri_std, np.asarray(rec.region_mask, bool)
        else:
            s0, s1 = eeg_span(rec, v0, v1)
            x, mean, std, mask = rec.eeg[:, s0:s1], st.eeg_mean, st.eeg_std, channel_mask(rec)
        z = (np.asarray(x, np.float64) - mean[:, None]) / std[:, None]
        z[~mask] = 0.0
        out.append(z)
    return out


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
