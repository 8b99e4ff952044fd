"""Data types shared by every data source (simulated cohort, BIDS, store).

Axes are explicit and fixed: EEG is ``[channels, samples]``, fMRI is
``[regions, volumes]``; nothing ever guesses the layout from a shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twinbrain.data.mapped import all_finite, row_blocks_bytes
from twinbrain.schema import MODALITIES

POSITION_UNIT = "mm"   # unit of Recording.region_pos / channel_pos (MNI millimetres for regions)


def present_modalities(n_fmri_slots: int, n_eeg_slots: int) -> tuple[str, ...]:
    """Modalities with at least one node slot. An absent modality (e.g. EEG in an fMRI-only cohort) still
    flows through the model as empty tensors, but it is not balanced, logged or scored."""
    present = tuple(m for m, n in zip(MODALITIES, (n_fmri_slots, n_eeg_slots)) if n > 0)
    if not present:
        raise ValueError("the cohort has neither fMRI regions nor EEG channels")
    return present


def entity_label(subject: str, session: str = "", task: str = "", run: str = "") -> str:
    """BIDS-style run id with only the entities that have a value: ``sub-01_task-rest``, never
    ``sub-01_ses-_task-rest_run-``."""
    return "_".join(f"{k}-{v}" for k, v in (("sub", subject), ("ses", session), ("task", task), ("run", run)) if v)


def modality_counts(rec: "Recording") -> tuple[int, int]:
    """``(n_fmri_rows, n_eeg_rows)`` of a recording."""
    return int(rec.fmri.shape[0]), int(rec.eeg.shape[0])


def cohort_fingerprint(recordings: list["Recording"]) -> str:
    """sha256 over every recording's ids, clock, node names and signal bytes (float32): equal only for the
    same data on the same clock. Stored in checkpoints so every verb can verify the cohort it rebuilds."""
    import hashlib
    h = hashlib.sha256()
    for r in recordings:
        h.update(repr((r.key, r.tr, r.eeg_sfreq, round(float(r.eeg_onset_s), 9), list(r.region_names),
                       list(r.channel_names), r.fmri.shape, r.eeg.shape)).encode())
        for arr in (r.fmri, r.eeg):
            for block in row_blocks_bytes(arr):        # same bytes as the whole array, O(block) memory
                h.update(block)
    return h.hexdigest()[:32]


@dataclass
class Recording:
    """One run: (subject, session, task, run), with EEG, fMRI or both.

    An absent modality has zero rows on the shared clock (EEG ``[0, S]`` or fMRI ``[0, T]``); the clock
    of an EEG-only run is a latent step instead of a TR (see :mod:`twinbrain.data.clock`).

    Attributes:
        eeg: ``[C, S]`` float32, channels x samples at ``eeg_sfreq`` Hz.
        fmri: ``[R, T]`` float32, regions x volumes, one volume every ``tr`` s.
            Rows of regions absent in this subject (``region_mask`` False) are 0.
        eeg_onset_s: time of EEG sample 0 relative to the onset of fMRI volume 0
            (positive: EEG starts later). Windows are cut on the shared clock.
        channel_pos / region_pos: ``[C, 3]`` / ``[R, 3]`` positions in millimetres (MNI for regions; for
            channels the frame of the dataset's electrodes, see docs/data.md), 0 where unknown.
        region_mask: ``[R]`` bool, True where the atlas slot has data.
        modules: ``[R]`` int network label per region, or None if unknown.
    """
    subject: str
    session: str
    task: str
    run: str
    eeg: np.ndarray
    eeg_sfreq: float
    fmri: np.ndarray
    tr: float
    channel_names: list[str]
    region_names: list[str]
    channel_pos: np.ndarray
    region_pos: np.ndarray
    region_mask: np.ndarray
    eeg_onset_s: float = 0.0
    modules: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return entity_label(self.subject, self.session, self.task, self.run)

    @property
    def duration_s(self) -> float:
        """Span covered by both modalities, on the fMRI clock."""
        fmri_end = self.fmri.shape[1] * self.tr
        eeg_end = self.eeg_onset_s + self.eeg.shape[1] / self.eeg_sfreq
        return min(fmri_end, eeg_end) - max(0.0, self.eeg_onset_s)

    def check(self, source: str = "") -> None:
        """Raise ValueError naming ``source`` for inconsistent shapes or non-finite values."""
        where = source or self.key
        c, r = len(self.channel_names), len(self.region_names)
        if self.eeg.ndim != 2 or self.eeg.shape[0] != c:
            raise ValueError(f"{where}: EEG must be [channels={c}, samples], got {self.eeg.shape}")
        if self.fmri.ndim != 2 or self.fmri.shape[0] != r:
            raise ValueError(f"{where}: fMRI must be [regions={r}, volumes], got {self.fmri.shape}")
        if self.channel_pos.shape != (c, 3) or self.region_pos.shape != (r, 3):
            raise ValueError(f"{where}: positions must be [C, 3] and [R, 3], got "
                             f"{self.channel_pos.shape} and {self.region_pos.shape}")
        if self.region_mask.shape != (r,):
            raise ValueError(f"{where}: region_mask must be [R={r}], got {self.region_mask.shape}")
        for name, arr in (("EEG", self.eeg), ("fMRI", self.fmri)):
            if not all_finite(arr):
                bad = int((~np.isfinite(arr)).sum())
                raise ValueError(f"{where}: {name} has {bad} NaN/Inf values; interpolate or drop the "
                                 f"affected channels/volumes before training")
        if self.tr <= 0 or self.eeg_sfreq <= 0:
            raise ValueError(f"{where}: TR ({self.tr}) and EEG sampling rate ({self.eeg_sfreq}) must be > 0")


@dataclass
class GroundTruth:
    """What the simulator knows and a trained twin should recover.

    coupling: ``[R, R]`` directed group coupling, ``coupling[i, j]`` = influence of j on i.
    subject_coupling: subject id -> ``[R, R]`` that subject's coupling.
    perturb_regions: ``[P]`` stimulated region indices.
    perturb_bold: subject id -> ``[P, R, T_resp]`` Δ-BOLD (perturbed - baseline run) after the pulse.
    perturb_eeg: subject id -> ``[P, C, S_resp]`` Δ-EEG after the pulse.
    perturb_onset_s: pulse onset within the paired runs (s); responses start there.
    modules: ``[R]`` module labels; gain: ``[C, R]`` EEG lead-field-like matrix.
    """
    coupling: np.ndarray
    subject_coupling: dict[str, np.ndarray]
    perturb_regions: np.ndarray
    perturb_bold: dict[str, np.ndarray]
    perturb_eeg: dict[str, np.ndarray]
    perturb_onset_s: float
    modules: np.ndarray
    gain: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cohort:
    recordings: list[Recording]
    truth: GroundTruth | None = None

    @property
    def subjects(self) -> list[str]:
        return sorted({r.subject for r in self.recordings})
