"""Write a :class:`Cohort` as a BIDS-derivative dataset that ``twinbrain prepare`` reads back.

Layout (``ses-`` / ``run-`` levels only when the recording has those labels)::

    dataset_description.json                      DatasetType "derivative"
    truth.npz                                     simulator ground truth (when the cohort has it)
    sub-01/ses-1/eeg/sub-01_ses-1_task-rest_run-1_eeg.fif     (.edf or .vhdr/.vmrk/.eeg on request)
                     ..._eeg.json  _channels.tsv  _electrodes.tsv  _coordsystem.json
    sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_bold.tsv   (.npy on request)
                      ..._bold.json (RepetitionTime)  _regions.tsv (index, name, x/y/z mm, module, mask)

EEG carries one annotation per fMRI volume (``marker``, default ``R128``) at the volume onset on the EEG
clock, so the reader synchronises from scanner markers exactly as for real data. The fMRI TSV has one
column per region (header = region names) and one row per volume; the ``.npy`` is ``[regions x
volumes]``. Positions: electrodes.tsv and the region table in millimetres (the Recording's unit).
"""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np

from twinbrain.data.types import Cohort, Recording

TRUTH_FILE = "truth.npz"
EEG_FORMATS = {"fif": ".fif", "edf": ".edf", "brainvision": ".vhdr"}


def _label(value: str, what: str, rec: Recording) -> str:
    if value and not value.isalnum():
        raise ValueError(f"{rec.key}: {what} label '{value}' is not alphanumeric, which BIDS requires; "
                         f"rename it (e.g. '{''.join(c for c in value if c.isalnum())}')")
    return value


def run_stem(rec: Recording) -> tuple[Path, str]:
    """(session folder relative to the root, file stem) of a recording."""
    sub = _label(rec.subject, "subject", rec)
    if not sub:
        raise ValueError(f"{rec.key}: empty subject label")
    ses, task, run = (_label(v, w, rec) for v, w in ((rec.session, "session"), (rec.task, "task"),
                                                     (rec.run, "run")))
    folder = Path(f"sub-{sub}") / (f"ses-{ses}" if ses else "")
    parts = [f"sub-{sub}"] + [f"{k}-{v}" for k, v in (("ses", ses), ("task", task or "rest"), ("run", run)) if v]
    return folder, "_".join(parts)


def _write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def volume_onsets(rec: Recording) -> np.ndarray:
    """EEG-clock times (s) of every fMRI volume onset, ``[T]``; checks the EEG covers the whole run."""
    onsets = np.arange(rec.fmri.shape[1]) * rec.tr - rec.eeg_onset_s
    eeg_len = rec.eeg.shape[1] / rec.eeg_sfreq
    if onsets[0] < 0 or onsets[-1] + rec.tr > eeg_len + 1e-9:
        raise ValueError(f"{rec.key}: EEG ({eeg_len:.2f} s, onset {rec.eeg_onset_s:+.2f} s) does not cover the "
                         f"fMRI run ({rec.fmri.shape[1]} x {rec.tr} s); the BIDS reader requires EEG spanning "
                         f"every volume - trim the fMRI volumes outside the EEG first")
    return onsets


def write_eeg(rec: Recording, folder: Path, stem: str, fmt: str = "fif", marker: str = "R128") -> Path:
    """EEG file with volume markers + ``_eeg.json``, ``_channels.tsv``, ``_electrodes.tsv``, ``_coordsystem.json``."""
    import mne
    if fmt not in EEG_FORMATS:
        raise ValueError(f"EEG format '{fmt}' not supported; use one of {', '.join(EEG_FORMATS)}")
    folder.mkdir(parents=True, exist_ok=True)
    onsets = volume_onsets(rec) if rec.fmri.shape[0] else np.zeros(0)   # EEG-only: no scanner, no markers
    info = mne.create_info(list(rec.channel_names), rec.eeg_sfreq, "eeg")
    raw = mne.io.RawArray(np.asarray(rec.eeg, np.float64), info, verbose="error")
    pos = np.asarray(rec.channel_pos, float)
    if np.abs(pos).sum() > 0:
        montage = mne.channels.make_dig_montage(dict(zip(rec.channel_names, pos / 1e3)), coord_frame="head")
        raw.set_montage(montage, on_missing="ignore", verbose="error")
    raw.set_annotations(mne.Annotations(onsets, np.zeros(len(onsets)), [marker] * len(onsets)))
    path = folder / f"{stem}_eeg{EEG_FORMATS[fmt]}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # float -> float32 / EDF range notes
        if fmt == "fif":
            raw.save(path, overwrite=True, verbose="error")
        else:
            mne.export.export_raw(path, raw, fmt=fmt, overwrite=True, verbose="error")
    _write_json(folder / f"{stem}_eeg.json", {
        "TaskName": rec.task or "rest", "SamplingFrequency": rec.eeg_sfreq, "EEGReference": "n/a",
        "PowerLineFrequency": "n/a", "SoftwareFilters": "n/a", "EEGChannelCount": len(rec.channel_names),
        "RecordingDuration": rec.eeg.shape[1] / rec.eeg_sfreq,
        "Description": "TwinBrain export; one annotation per fMRI volume marks the volume onset"
        if len(onsets) else "TwinBrain export (EEG-only run)", **({"VolumeMarker": marker} if len(onsets) else {})})
    _write_tsv(folder / f"{stem}_channels.tsv", ["name", "type", "units", "status"],
               [[n, "EEG", "V", "good"] for n in rec.channel_names])
    _write_tsv(folder / f"{stem}_electrodes.tsv", ["name", "x", "y", "z"],
               [[n, *(f"{v:.6f}" for v in p)] for n, p in zip(rec.channel_names, pos)])
    _write_json(folder / f"{stem}_coordsystem.json", {"EEGCoordinateSystem": "CapTrak",
                                                      "EEGCoordinateUnits": "mm"})
    return path


def write_fmri(rec: Recording, folder: Path, stem: str, fmt: str = "tsv") -> Path:
    """Parcellated fMRI + ``_bold.json`` (RepetitionTime) + ``_regions.tsv``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(rec.region_names)
    if fmt == "tsv":
        path = folder / f"{stem}_bold.tsv"
        data = np.asarray(rec.fmri, np.float64)               # [R, T] -> rows are volumes
        _write_tsv(path, names, [[f"{v:.7g}" for v in row] for row in data.T])
    elif fmt == "npy":
        path = folder / f"{stem}_bold.npy"
        np.save(path, np.asarray(rec.fmri, np.float32))       # [R, T]
    else:
        raise ValueError(f"fMRI format '{fmt}' not supported; use 'tsv' or 'npy'")
    _write_json(folder / f"{stem}_bold.json", {
        "RepetitionTime": rec.tr, "TaskName": rec.task or "rest",
        "Description": "parcellated BOLD, one series per region of the _regions.tsv table",
        "Dimensions": ["volume", "region"] if fmt == "tsv" else ["region", "volume"]})
    mm = np.asarray(rec.region_pos, float)
    header = ["index", "name", "x", "y", "z"] + (["module"] if rec.modules is not None else []) + ["mask"]
    rows = []
    for i, n in enumerate(names):
        row = [i + 1, n, *(f"{v:.6f}" for v in mm[i])]
        if rec.modules is not None:
            row.append(int(rec.modules[i]))
        rows.append(row + [int(bool(rec.region_mask[i]))])
    _write_tsv(folder / f"{stem}_regions.tsv", header, rows)
    return path


def write_cohort_bids(cohort: Cohort, out_dir: str | Path, *, eeg_format: str = "fif",
                      fmri_format: str = "tsv", marker: str = "R128") -> Path:
    """Write every recording (and the ground truth, if any) under ``out_dir``; returns ``out_dir``.

    ``eeg_format``: 'fif' (default, lossless float), 'edf' (16-bit, needs ``edfio``) or 'brainvision'
    (needs ``pybv``). ``fmri_format``: 'tsv' or 'npy'.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen = set()
    for rec in cohort.recordings:
        rec.check()
        folder, stem = run_stem(rec)
        if stem in seen:
            raise ValueError(f"two recordings map to the same BIDS name {stem}; give them distinct run labels")
        seen.add(stem)
        if rec.eeg.shape[0]:               # a one-modality run writes only the modality it has
            write_eeg(rec, out / folder / "eeg", stem, eeg_format, marker)
        if rec.fmri.shape[0]:
            write_fmri(rec, out / folder / "func", stem, fmri_format)
    _write_json(out / "dataset_description.json", {
        "Name": "TwinBrain cohort", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "twinbrain", "Description": "write_cohort_bids"}],
        "HowToAcknowledge": "simulated data" if cohort.truth is not None else "n/a"})
    if cohort.truth is not None:
        from twinbrain.data.simulate import save_truth  # lazy: only cohorts from the simulator
        save_truth(cohort.truth, out / TRUTH_FILE)
    return out
