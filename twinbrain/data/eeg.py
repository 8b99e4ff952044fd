"""EEG reading and causal preprocessing with MNE.

Pipeline for one run (every step is causal, so a forecast never sees filtered-in future samples):
read (.set/.vhdr/.edf/.bdf/.fif) -> keep EEG channels (ECG/EOG/EMG/misc/stim dropped and recorded)
-> positions (electrodes.tsv > positions in the file > standard 10-20 template) -> band-pass with a
minimum-phase (causal) FIR -> average reference -> resample onto the fMRI clock by linear interpolation
(after the low-pass; looks at most one input sample ahead) -> per-channel robust z-score (median / IQR).

Gradient and ballistocardiogram artefacts are NOT removed here: give the cleaned EEG (e.g. from
``derivatives/``, after FASTR/AAS and OBS in EEGLAB/BrainVision Analyzer). Raw in-scanner EEG would be
processed without complaint but is dominated by those artefacts.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from twinbrain.data.bids import read_json, read_tsv

# Scanner volume marker descriptions tried when data.volume_marker is empty (BrainVision 'R128',
# EEGLAB 'V'/'TR', toggles 'T  1'); MNE prefixes BrainVision markers with their type ('Response/R128').
DEFAULT_MARKERS = ("R128", "R 128", "V", "TR", "Volume", "T  1", "T1")
_NON_EEG_NAME = {"ecg": r"^(ECG|EKG)", "eog": r"^(EOG|VEOG|HEOG|LEOG|REOG)", "emg": r"^EMG",
                 "stim": r"^(STI|STATUS|TRIG)", "misc": r"^(RESP|GSR|PULSE|PPG)"}
_BIDS_TYPES = {"EEG": "eeg", "ECG": "ecg", "EKG": "ecg", "EOG": "eog", "VEOG": "eog", "HEOG": "eog",
               "EMG": "emg", "TRIG": "stim", "MISC": "misc", "RESP": "resp", "GSR": "gsr", "PPG": "bio"}
_UNITS = {"m": 1e3, "cm": 10.0, "mm": 1.0}      # -> millimetres


@dataclass
class EEGRun:
    """Preprocessed EEG on the fMRI clock.

    data: ``[C, S]`` float32, robust z-scored, sample ``k`` at ``onset_s + k / sfreq`` s after volume 0.
    pos: ``[C, 3]`` millimetres (the frame of electrodes.tsv / the file); channels without a position are
        at 0 (listed in meta).
    """
    data: np.ndarray
    sfreq: float
    onset_s: float
    ch_names: list[str]
    pos: np.ndarray
    meta: dict = field(default_factory=dict)


def read_raw(path: Path):
    """Read any supported EEG file fully into memory, with the file named in any error."""
    import mne
    readers = {".set": mne.io.read_raw_eeglab, ".vhdr": mne.io.read_raw_brainvision,
               ".edf": mne.io.read_raw_edf, ".bdf": mne.io.read_raw_bdf, ".fif": mne.io.read_raw_fif}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unsupported EEG format '{path.suffix}'; use one of {', '.join(readers)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            raw = reader(path, preload=True, verbose="error")
    except Exception as exc:  # MNE raises many types for damaged files
        raise ValueError(f"{path}: could not read EEG ({type(exc).__name__}: {exc}); the file is truncated "
                         f"or corrupt - re-export or re-download it (with its companion files)") from exc
    _check_complete(raw, path)
    return raw


def _check_complete(raw, path: Path) -> None:
    """Catch truncation that readers let through (zero-filled or missing tails)."""
    if raw.n_times < 2:
        raise ValueError(f"{path}: EEG has {raw.n_times} samples; the file is truncated - re-export it")
    if path.suffix.lower() in (".edf", ".bdf"):
        size, expected = path.stat().st_size, _edf_expected_size(path)
        if expected is not None and size < expected:
            raise ValueError(f"{path}: {size} bytes but its header promises {expected}; the file is "
                             f"truncated - re-export or re-download it")


def _edf_expected_size(path: Path) -> int | None:
    """File size the EDF/BDF header declares (None if it does not say: n_records = -1)."""
    with open(path, "rb") as fh:
        head = fh.read(256)
        try:
            header_bytes, n_records, ns = int(head[184:192]), int(head[236:244]), int(head[252:256])
            fh.seek(256 + ns * 216)                   # per-signal 'samples per record' fields
            samples = [int(fh.read(8)) for _ in range(ns)]
        except ValueError:
            return None
    if n_records < 0:
        return None
    return header_bytes + n_records * sum(samples) * (3 if path.suffix.lower() == ".bdf" else 2)


def pick_eeg(raw, channels_tsv: Path | None, source: Path) -> dict[str, list[str]]:
    """Type channels (channels.tsv, else name patterns), drop non-EEG and bad ones; returns what was dropped."""
    types, bads = {}, []
    if channels_tsv is not None:
        for row in read_tsv(channels_tsv):
            name = row.get("name", "")
            if name in raw.ch_names:
                t = _BIDS_TYPES.get(row.get("type", "").upper())
                if t:
                    types[name] = t
                if row.get("status", "").lower() == "bad":
                    bads.append(name)
    for name, kind in zip(raw.ch_names, raw.get_channel_types()):
        if name not in types and kind == "eeg":
            for t, pat in _NON_EEG_NAME.items():
                if re.match(pat, name, re.IGNORECASE):
                    types[name] = t
    if types:
        raw.set_channel_types(types, on_unit_change="ignore", verbose="error")
    dropped: dict[str, list[str]] = {}
    for name, kind in zip(raw.ch_names, raw.get_channel_types()):
        if kind != "eeg":
            dropped.setdefault(kind, []).append(name)
    bads = [b for b in bads if b not in sum(dropped.values(), [])]
    if bads:
        dropped["bad"] = bads
    keep = [n for n, k in zip(raw.ch_names, raw.get_channel_types()) if k == "eeg" and n not in bads]
    if len(keep) < 2:
        raise ValueError(f"{source}: only {len(keep)} usable EEG channel(s) ({keep}); dropped {dropped}. "
                         f"Average reference and graphs need >= 2; fix channel types in channels.tsv")
    raw.pick(keep)
    return dropped


def channel_positions(raw, electrodes: Path | None, coordsystem: Path | None, source: Path) -> tuple[np.ndarray, str]:
    """``[C, 3]`` millimetres: electrodes.tsv (units from coordsystem.json), else positions stored in the file
    (MNE keeps metres), else the 10-20 template (MNE head frame)."""
    names = raw.ch_names
    pos = np.full((len(names), 3), np.nan)
    origin = "file"
    if electrodes is not None:
        unit = read_json(coordsystem).get("EEGCoordinateUnits", "m") if coordsystem else "m"
        scale = _UNITS.get(str(unit), 1e3)
        rows = {r.get("name"): r for r in read_tsv(electrodes)}
        for i, n in enumerate(names):
            r = rows.get(n)
            if r is not None:
                try:
                    pos[i] = [float(r["x"]) * scale, float(r["y"]) * scale, float(r["z"]) * scale]
                except (KeyError, ValueError):
                    pass
        origin = electrodes.name
    else:
        pos = np.array([ch["loc"][:3] for ch in raw.info["chs"]], dtype=float) * 1e3     # MNE: metres
        pos[np.all(pos == 0, axis=1)] = np.nan
    if np.isnan(pos).all():
        pos, origin = _template_positions(raw), "template"
    missing = [n for n, p in zip(names, pos) if np.isnan(p).any()]
    if missing:
        warnings.warn(f"{source}: {len(missing)} EEG channel(s) have no position ({', '.join(missing)}); "
                      f"they are placed at the head centre. Add them to electrodes.tsv for spatial features.",
                      stacklevel=2)
    return np.nan_to_num(pos, nan=0.0), origin


def _template_positions(raw) -> np.ndarray:
    import mne
    name = "colin27_1020" if "colin27_1020" in mne.channels.get_builtin_montages() else "standard_1020"
    montage = mne.channels.make_standard_montage(name)
    tmp = raw.copy().pick(raw.ch_names[:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp.set_montage(montage, match_case=False, on_missing="ignore", verbose="error")
    return np.array([ch["loc"][:3] for ch in tmp.info["chs"]], dtype=float) * 1e3      # metres -> mm


def volume_markers(raw, marker: str = "") -> tuple[np.ndarray, str]:
    """Times (s from EEG sample 0) of scanner volume markers, and the description that matched.

    ``marker`` empty tries :data:`DEFAULT_MARKERS`; a description matches exactly or as the part after
    the type prefix MNE adds (``'Response/R128'``). Returns an empty array when none are found.
    """
    ann = raw.annotations
    desc = [str(d) for d in ann.description]
    onset = np.asarray(ann.onset, float)
    if ann.orig_time is not None:  # then onsets count from the measurement start, not the first sample
        onset = onset - raw.first_time
    for cand in ([marker] if marker else list(DEFAULT_MARKERS)):
        want = cand.replace(" ", "")
        hit = np.array([d == cand or d.rsplit("/", 1)[-1].replace(" ", "") == want for d in desc], bool)
        if hit.sum() >= 2:
            return np.sort(onset[hit]), cand
    return np.zeros(0), ""


def onset_from_markers(times: np.ndarray, tr: float, n_vols: int, discarded: int, source: Path) -> tuple[float, str]:
    """EEG onset on the fMRI clock (s) = -(EEG time of the marker of volume 0); checks TR and count."""
    step = float(np.median(np.diff(times)))
    if abs(step - tr) > 0.02 * tr:
        raise ValueError(f"{source}: volume markers are {step:.4f} s apart but RepetitionTime is {tr} s; "
                         f"the marker is not one per volume (set data.volume_marker to the volume trigger) "
                         f"or the TR in the sidecar is wrong")
    note = ""
    expected = n_vols + discarded
    if len(times) != expected:
        note = (f"{len(times)} volume markers for {n_vols} volumes (+{discarded} discarded); "
                f"volume 0 taken as marker {discarded}")
    if len(times) <= discarded:
        raise ValueError(f"{source}: {len(times)} volume markers but {discarded} volumes discarded; "
                         f"NumberOfVolumesDiscardedByUser in the BOLD sidecar is wrong")
    return -float(times[discarded]), note


def robust_zscore(x: np.ndarray) -> np.ndarray:
    """Per row ``(x - median) / (IQR / 1.349)`` (equals the std for Gaussian data); ``x`` is ``[C, S]``."""
    med = np.median(x, axis=1, keepdims=True)
    q75, q25 = np.percentile(x, [75, 25], axis=1, keepdims=True)
    scale = (q75 - q25) / 1.349
    return (x - med) / np.where(scale > 0, scale, 1.0)


def resample_to_clock(x: np.ndarray, sfreq: float, onset_s: float, sfreq_out: float, n_out: int) -> np.ndarray:
    """Linear interpolation of ``x`` ``[C, S]`` (sample ``i`` at ``onset_s + i / sfreq`` s) onto
    ``t_k = k / sfreq_out``, ``k < n_out``. Caller guarantees the grid lies inside the recording."""
    pos = (np.arange(n_out) / sfreq_out - onset_s) * sfreq
    pos = np.clip(pos, 0, x.shape[1] - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), x.shape[1] - 2)
    w = (pos - i0).astype(x.dtype)
    return x[:, i0] * (1 - w) + x[:, i0 + 1] * w


def _read_checked(path: Path, l_freq: float, h_freq: float, sidecar: Path | None, channels: Path | None,
                  electrodes: Path | None, coordsystem: Path | None):
    """Read ``path``, check its rate against the sidecar, keep usable EEG channels, find positions.
    Returns ``(raw, sfreq, pos [C, 3], meta)``."""
    raw = read_raw(path)
    sfreq = float(raw.info["sfreq"])
    meta: dict = {"eeg_file": str(path), "eeg_sfreq_raw": sfreq}
    if sidecar is not None:
        declared = read_json(sidecar).get("SamplingFrequency")
        if isinstance(declared, (int, float)) and abs(declared - sfreq) > 1e-3 * sfreq:
            raise ValueError(f"{sidecar}: SamplingFrequency {declared} Hz but {path.name} is sampled at "
                             f"{sfreq} Hz; fix the sidecar (or re-export the file)")
    else:
        warnings.warn(f"{path}: no *_eeg.json sidecar; using the sampling rate in the file ({sfreq} Hz)",
                      stacklevel=2)
    if h_freq >= sfreq / 2:
        raise ValueError(f"{path}: sampled at {sfreq} Hz, too slow for data.eeg_h_freq={h_freq} Hz; "
                         f"lower eeg_h_freq below {sfreq / 2} Hz")
    meta["dropped_channels"] = pick_eeg(raw, channels, path)
    if not np.isfinite(raw._data).all():
        raise ValueError(f"{path}: EEG contains NaN/Inf samples; interpolate or remove them before preparing")
    # Flat channels (e.g. the online reference stored as zeros) carry nothing; drop them before
    # re-referencing mixes them with the others.
    flat = [n for n, f in zip(raw.ch_names, np.ptp(raw._data, axis=1) == 0) if f]
    if flat:
        if len(raw.ch_names) - len(flat) < 2:
            raise ValueError(f"{path}: EEG channels {flat} are flat, fewer than 2 usable channels remain; "
                             f"check the recording")
        warnings.warn(f"{path}: dropped flat EEG channel(s) {flat}", stacklevel=2)
        meta["dropped_channels"]["flat"] = flat
        raw.drop_channels(flat)
    pos, meta["positions"] = channel_positions(raw, electrodes, coordsystem, path)
    meta["channels_without_position"] = [n for n, p in zip(raw.ch_names, pos) if not p.any()]

    return raw, sfreq, pos, meta


def _check_band(l_freq: float, h_freq: float, sfreq_out: float) -> None:
    if not 0 < l_freq < h_freq:
        raise ValueError(f"data.eeg_l_freq={l_freq} / data.eeg_h_freq={h_freq}: need 0 < l_freq < h_freq")
    if h_freq >= sfreq_out / 2:
        raise ValueError(f"data.eeg_h_freq={h_freq} Hz is not below the Nyquist frequency of "
                         f"data.eeg_sfreq={sfreq_out} Hz; lower eeg_h_freq or raise eeg_sfreq")


def _filter_reref(raw, l_freq: float, h_freq: float):
    """Causal band-pass (minimum-phase FIR, padded with the first value: reflection would pull future
    samples into the start) and average reference; returns float64 ``[C, S]``."""
    raw.filter(l_freq, h_freq, phase="minimum", fir_design="firwin", pad="edge", verbose="error")
    raw.set_eeg_reference("average", projection=False, verbose="error")
    return raw.get_data()


def load_eeg_alone(path: Path, *, l_freq: float, h_freq: float, sfreq_out: float, sidecar: Path | None = None,
                   channels: Path | None = None, electrodes: Path | None = None,
                   coordsystem: Path | None = None) -> EEGRun:
    """Read and clean one EEG run that has no fMRI: the same pipeline as :func:`load_eeg` on the EEG's own
    clock (sample 0 of the file is time 0; no synchronisation), resampled to ``sfreq_out`` Hz."""
    _check_band(l_freq, h_freq, sfreq_out)
    raw, sfreq, pos, meta = _read_checked(path, l_freq, h_freq, sidecar, channels, electrodes, coordsystem)
    data = _filter_reref(raw, l_freq, h_freq)
    n_out = int(np.floor((raw.n_times - 1) / sfreq * sfreq_out + 1e-9)) + 1
    data = robust_zscore(resample_to_clock(data, sfreq, 0.0, sfreq_out, n_out)).astype(np.float32)
    meta.update(l_freq=l_freq, h_freq=h_freq, reference="average", sync="none (EEG-only run)",
                artefact_removal="none here: artefact cleaning must precede prepare")
    return EEGRun(data, float(sfreq_out), 0.0, list(raw.ch_names), pos.astype(np.float32), meta)


def load_eeg(path: Path, *, tr: float, n_vols: int, l_freq: float, h_freq: float, sfreq_out: float,
             marker: str = "", discarded: int = 0, fallback_onset_s: float | None = None,
             sidecar: Path | None = None, channels: Path | None = None, electrodes: Path | None = None,
             coordsystem: Path | None = None, fmri_source: Path | None = None) -> EEGRun:
    """Read, clean and synchronise one EEG run to an fMRI run of ``n_vols`` volumes every ``tr`` s.

    The result covers exactly the fMRI run: ``round(n_vols * tr * sfreq_out)`` samples starting at
    volume 0 (``onset_s == 0``). Synchronisation uses scanner volume markers when present, else
    ``fallback_onset_s`` (EEG start minus fMRI start, from scans.tsv) or 0, with a warning.
    """
    _check_band(l_freq, h_freq, sfreq_out)
    raw, sfreq, pos, meta = _read_checked(path, l_freq, h_freq, sidecar, channels, electrodes, coordsystem)

    times, found = volume_markers(raw, marker)
    if len(times):
        onset, note = onset_from_markers(times, tr, n_vols, discarded, path)
        meta.update(sync="volume_markers", marker=found, n_markers=len(times))
        if note:
            warnings.warn(f"{path}: {note}", stacklevel=2)
            meta["sync_note"] = note
    else:
        onset = 0.0 if fallback_onset_s is None else float(fallback_onset_s)
        how = "acq_time in scans.tsv" if fallback_onset_s is not None else "assuming both started together"
        warnings.warn(f"{path}: no scanner volume markers ({marker or ' / '.join(DEFAULT_MARKERS)}) in the "
                      f"annotations; aligned to the fMRI by onsets ({how}, offset {onset:+.3f} s). Set "
                      f"data.volume_marker if the dataset uses another marker name.", stacklevel=2)
        meta["sync"] = "acq_time" if fallback_onset_s is not None else "none"

    fmri_end = n_vols * tr
    eeg_end = onset + (raw.n_times - 1) / sfreq
    if onset > 1.0 / sfreq or eeg_end < fmri_end - 1.0 / sfreq_out - 1.0 / sfreq:
        raise ValueError(f"{path}: EEG covers {onset:.3f} to {eeg_end:.3f} s on the fMRI clock but the fMRI run "
                         f"({(fmri_source or 'BOLD')}) spans 0 to {fmri_end:.3f} s ({n_vols} volumes x TR {tr} s); "
                         f"EEG shorter than the fMRI run - supply the complete EEG or trim the fMRI volumes "
                         f"it does not cover")

    data = _filter_reref(raw, l_freq, h_freq)         # float64 [C, S]; MNE already holds a copy
    n_out = int(round(fmri_end * sfreq_out))
    data = resample_to_clock(data, sfreq, onset, sfreq_out, n_out)
    data = robust_zscore(data).astype(np.float32)
    meta.update(l_freq=l_freq, h_freq=h_freq, onset_raw_s=onset, reference="average",
                artefact_removal="none here: gradient/BCG cleaning must precede prepare")
    return EEGRun(data, float(sfreq_out), 0.0, list(raw.ch_names), pos.astype(np.float32), meta)
