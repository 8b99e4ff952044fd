"""Small synthetic recordings for data-pipeline tests (no simulator needed)."""
from __future__ import annotations

import numpy as np

from twinbrain.config import Config
from twinbrain.data.types import Cohort, Recording


def make_recording(subject: str = "01", session: str = "1", *, n_regions: int = 6, n_channels: int = 4,
                   n_vols: int = 120, tr: float = 1.0, sfreq: float = 20.0, onset: float = 0.0,
                   seed: int = 0, fmri: np.ndarray | None = None, eeg: np.ndarray | None = None) -> Recording:
    """AR(1) fMRI ``[R, n_vols]`` and white-ish EEG ``[C, S]`` covering the fMRI span from ``onset`` on."""
    rng = np.random.default_rng(seed)
    if fmri is None:
        fmri = np.zeros((n_regions, n_vols))
        e = rng.standard_normal((n_regions, n_vols))
        for t in range(1, n_vols):
            fmri[:, t] = 0.8 * fmri[:, t - 1] + e[:, t]
        fmri = fmri + 100.0  # raw BOLD has a large offset; normalisation must remove it
    n_regions, n_vols = fmri.shape
    if eeg is None:
        n_samp = int(round((n_vols * tr - onset) * sfreq))
        eeg = 1e-5 * rng.standard_normal((n_channels, n_samp))
    n_channels = eeg.shape[0]
    return Recording(
        subject=subject, session=session, task="rest", run="1",
        eeg=np.asarray(eeg, np.float32), eeg_sfreq=sfreq, fmri=np.asarray(fmri, np.float32), tr=tr,
        channel_names=[f"E{i}" for i in range(n_channels)], region_names=[f"R{i}" for i in range(n_regions)],
        channel_pos=rng.standard_normal((n_channels, 3)).astype(np.float32),
        region_pos=rng.standard_normal((n_regions, 3)).astype(np.float32),
        region_mask=np.ones(n_regions, bool), eeg_onset_s=onset)


def make_cohort(n_subjects: int = 4, n_sessions: int = 1, **kw) -> Cohort:
    recs = [make_recording(f"{s:02d}", str(ses + 1), seed=100 * s + ses, **kw)
            for s in range(n_subjects) for ses in range(n_sessions)]
    return Cohort(recs)


def make_config(**data) -> Config:
    """A config for synthetic cohorts (not validated against sim.*; the cohort is passed directly)."""
    cfg = Config()
    cfg.data.window_s, cfg.data.stride_s = 20.0, 10.0
    cfg.graph.k_fmri, cfg.graph.k_eeg, cfg.graph.k_cross, cfg.graph.threshold = 2, 2, 2, 0.0
    cfg.train.batch_size = 3
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg
