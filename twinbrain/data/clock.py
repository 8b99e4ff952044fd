"""The shared clock of a cohort with one modality absent.

Every window, statistic and graph is cut on one clock whose step is ``Recording.tr`` (see ``timing.py``).
With fMRI present that step is the TR. An absent modality is a modality with zero rows on that clock:

* **fMRI-only**: EEG ``[0, T * spt]`` at ``spt / tr`` Hz with ``spt = model.eeg_stride`` placeholder samples
  per TR, so one EEG latent step lines up with one TR (empty: it costs nothing).
* **EEG-only**: there is no TR, so the clock step is a **latent step** of ``data.latent_step_s`` seconds
  (default ``model.eeg_stride / eeg_sfreq``: one EEG latent step) and fMRI is ``[0, T]`` with
  ``T = floor(S / (latent_step_s * eeg_sfreq))`` steps. ``data.window_s`` / ``stride_s`` must then be whole
  numbers of latent steps, and ``latent_step_s * eeg_sfreq`` a whole multiple of ``model.eeg_stride``.

Sources store a one-modality run on the present modality's native clock (fMRI-only: EEG ``[0, T]`` at
``1 / tr``; EEG-only: fMRI ``[0, S]`` with ``tr = 1 / eeg_sfreq``), so a prepared store never depends on
model settings; :func:`apply_clock` re-clocks the empty modality when a cohort is loaded (free: it has no
data).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from twinbrain.config import Config
from twinbrain.data.types import Cohort, Recording

_EPS = 1e-6


def latent_step_s(cfg: Config, eeg_sfreq: float) -> float:
    """Clock step (s) of an EEG-only cohort sampled at ``eeg_sfreq`` Hz."""
    return cfg.data.latent_step_s or cfg.model.eeg_stride / eeg_sfreq


def fmri_only_clock(rec: Recording, eeg_samples_per_tr: int) -> Recording:
    """``rec`` (no EEG channels) with its empty EEG clocked at ``eeg_samples_per_tr`` samples per TR."""
    n = rec.fmri.shape[1] * eeg_samples_per_tr
    return dataclasses.replace(rec, eeg=np.zeros((0, n), np.float32), eeg_sfreq=eeg_samples_per_tr / rec.tr,
                               eeg_onset_s=0.0, channel_names=[], channel_pos=np.zeros((0, 3), np.float32))


def eeg_only_clock(rec: Recording, step_s: float, eeg_stride: int) -> Recording:
    """``rec`` (no fMRI regions) on a clock of ``step_s`` seconds: fMRI ``[0, T]``, ``tr = step_s``."""
    spt = step_s * rec.eeg_sfreq
    if abs(spt - round(spt)) > _EPS or round(spt) < 1 or round(spt) % eeg_stride:
        raise ValueError(f"{rec.key}: data.latent_step_s={step_s} s at {rec.eeg_sfreq} Hz is {spt:g} EEG samples, "
                         f"not a whole multiple of model.eeg_stride={eeg_stride}; choose latent_step_s = k * "
                         f"{eeg_stride / rec.eeg_sfreq:g} s (or 0 for one EEG latent step)")
    if abs(rec.eeg_onset_s) > _EPS:
        raise ValueError(f"{rec.key}: an EEG-only run has no fMRI clock to be offset from; eeg_onset_s must be 0, "
                         f"got {rec.eeg_onset_s}")
    n_steps = math.floor(rec.eeg.shape[1] / round(spt) + _EPS)
    return dataclasses.replace(rec, fmri=np.zeros((0, n_steps), np.float32), tr=float(step_s), region_names=[],
                               region_pos=np.zeros((0, 3), np.float32), region_mask=np.zeros(0, bool),
                               modules=None)


def apply_clock(cohort: Cohort, cfg: Config) -> Cohort:
    """The cohort with every one-modality recording on the shared clock described in the module doc.

    Recordings with both modalities are returned unchanged. A recording with neither is an error.
    """
    out = []
    for rec in cohort.recordings:
        if rec.meta.get("clock") == "recorded":      # a recorded cohort keeps the clock it was trained on
            out.append(rec)
            continue
        n_f, n_e = rec.fmri.shape[0], rec.eeg.shape[0]
        if n_f and not n_e:
            rec = fmri_only_clock(rec, cfg.model.eeg_stride)
        elif n_e and not n_f:
            rec = eeg_only_clock(rec, latent_step_s(cfg, rec.eeg_sfreq), cfg.model.eeg_stride)
        elif not n_f and not n_e:
            raise ValueError(f"{rec.key}: the run has neither fMRI regions nor EEG channels")
        out.append(rec)
    return Cohort(out, cohort.truth)


def native_placeholder(rec: Recording) -> Recording:
    """Store form of a one-modality run: the empty modality on the present one's native clock."""
    n_f, n_e = rec.fmri.shape[0], rec.eeg.shape[0]
    if n_f and not n_e:
        return fmri_only_clock(rec, 1)
    if n_e and not n_f:
        return dataclasses.replace(rec, fmri=np.zeros((0, rec.eeg.shape[1]), np.float32), tr=1.0 / rec.eeg_sfreq,
                                   region_names=[], region_pos=np.zeros((0, 3), np.float32),
                                   region_mask=np.zeros(0, bool), modules=None, eeg_onset_s=0.0)
    return rec
