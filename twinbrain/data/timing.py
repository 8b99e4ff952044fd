"""The shared clock: converting seconds on the fMRI clock to volumes and EEG samples.

Time 0 is the onset of fMRI volume 0. Volume ``v`` covers ``[v * tr, (v + 1) * tr)`` s.
EEG sample ``k`` is taken at ``eeg_onset_s + k / eeg_sfreq`` s. Every conversion in the data
pipeline goes through these helpers so graphs, statistics and windows agree on one clock.
"""
from __future__ import annotations

import math

import numpy as np

from twinbrain.data.types import Recording

_EPS = 1e-6  # tolerance (in volumes / samples) for float round-off in span boundaries


def common_span(rec: Recording) -> tuple[float, float]:
    """``(start_s, end_s)`` covered by both modalities, on the fMRI clock."""
    start = max(0.0, rec.eeg_onset_s)
    end = min(rec.fmri.shape[1] * rec.tr, rec.eeg_onset_s + rec.eeg.shape[1] / rec.eeg_sfreq)
    return start, end


def span_volumes(rec: Recording, start_s: float, end_s: float) -> tuple[int, int]:
    """Volumes ``[v0, v1)`` lying entirely inside ``[start_s, end_s)`` (clipped to the recording)."""
    v0 = max(0, math.ceil(start_s / rec.tr - _EPS))
    v1 = min(rec.fmri.shape[1], math.floor(end_s / rec.tr + _EPS))
    return v0, max(v0, v1)


def eeg_index(rec: Recording, t_s: float | np.ndarray) -> np.ndarray | int:
    """EEG sample index at time ``t_s`` (s, fMRI clock), rounded to the nearest sample."""
    idx = np.rint((np.asarray(t_s, dtype=np.float64) - rec.eeg_onset_s) * rec.eeg_sfreq).astype(np.int64)
    return int(idx) if idx.ndim == 0 else idx


def eeg_span(rec: Recording, v0: int, v1: int) -> tuple[int, int]:
    """EEG samples ``[s0, s1)`` covering fMRI volumes ``[v0, v1)``, clipped to the recording."""
    s0 = max(0, eeg_index(rec, v0 * rec.tr))
    s1 = min(rec.eeg.shape[1], eeg_index(rec, v1 * rec.tr))
    return s0, max(s0, s1)


def samples_per_tr(rec: Recording) -> int:
    """EEG samples per fMRI volume; raises if ``tr * eeg_sfreq`` is not a whole number."""
    spt = rec.tr * rec.eeg_sfreq
    if abs(spt - round(spt)) > 1e-6 or round(spt) < 1:
        raise ValueError(f"{rec.key}: TR {rec.tr} s x EEG {rec.eeg_sfreq} Hz = {spt} samples per volume, "
                         f"not a whole number; resample the EEG (data.eeg_sfreq) so tr * sfreq is an integer")
    return int(round(spt))


def volumes(seconds: float, tr: float, what: str) -> int:
    """``seconds`` as a whole number of TRs; raises naming ``what`` otherwise."""
    n = seconds / tr
    if abs(n - round(n)) > 1e-6 or round(n) < 1:
        raise ValueError(f"{what} = {seconds} s is not a positive whole number of TRs (TR {tr} s); "
                         f"choose a multiple of {tr} s")
    return int(round(n))


def channel_mask(rec: Recording) -> np.ndarray:
    """``[C]`` bool, True where the EEG channel slot has data.

    Real-data preparation may mark missing/bad channel slots with ``rec.meta['channel_mask']``;
    without it every channel counts as present.
    """
    m = rec.meta.get("channel_mask")
    if m is None:
        return np.ones(rec.eeg.shape[0], dtype=bool)
    m = np.asarray(m, dtype=bool)
    if m.shape != (rec.eeg.shape[0],):
        raise ValueError(f"{rec.key}: meta['channel_mask'] must be [C={rec.eeg.shape[0]}], got {m.shape}")
    return m
