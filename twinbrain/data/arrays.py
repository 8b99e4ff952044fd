"""Plain arrays as a data source (``data.source: arrays``, ``data.arrays_root: DIR``).

``DIR/manifest.json`` describes per-run arrays; paths are relative to ``DIR``::

    {"tr": 2.0,                          # s per fMRI volume (default for every run)
     "eeg_sfreq": 250.0,                 # Hz (default for every run)
     "regions": "regions.tsv",           # name, x, y, z (MNI mm), optional module, mask  - with fMRI
     "channels": "channels.tsv",         # name, x, y, z (MNI mm)                        - with EEG
     "runs": [{"subject": "01", "session": "1", "task": "rest", "run": "1",
               "fmri": "sub-01_bold.npy",  # [regions, volumes] .npy, or .tsv (one column per region)
               "eeg": "sub-01_eeg.npy",    # [channels, samples] .npy
               "eeg_onset_s": 0.0,         # EEG sample 0 on the fMRI clock (s), paired runs only
               "confounds": "c.tsv"}]}     # optional: nuisance columns, one row per volume

A run has ``fmri``, ``eeg`` or both; every run of a cohort has the same modalities (node slots are fixed).
``session``, ``task`` and ``run`` are optional; ``tr`` / ``eeg_sfreq`` may be given per run.
Preprocessing: fMRI rows get the BIDS pipeline's cleaning (linear detrend + confounds when given, z-score;
no temporal filter); EEG rows are assumed cleaned and band-limited already and are only robust z-scored
per channel (no filter: a filter over the whole run would leak the future into every window).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from twinbrain.config import Config
from twinbrain.data.bids import read_tsv
from twinbrain.data.clock import native_placeholder
from twinbrain.data.eeg import robust_zscore
from twinbrain.data.fmri import clean, load_confounds, read_parcellated, read_region_table
from twinbrain.data.types import Cohort, Recording, entity_label

MANIFEST = "manifest.json"
RUN_KEYS = {"subject", "session", "task", "run", "fmri", "eeg", "eeg_onset_s", "tr", "eeg_sfreq", "confounds",
            "clock"}
TOP_KEYS = {"tr", "eeg_sfreq", "regions", "channels", "runs", "description", "preprocessed", "truth",
            "fingerprint"}


class ArraysError(ValueError):
    """The arrays folder or its manifest is not usable; the message names the file and the fix."""


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not root.is_dir():
        raise FileNotFoundError(f"data.arrays_root {root} does not exist; point it at the folder holding {MANIFEST}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; data.source 'arrays' needs a {MANIFEST} listing the runs "
                                f"(see docs/data.md, 'Plain arrays')")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArraysError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(man, dict) or not isinstance(man.get("runs"), list) or not man["runs"]:
        raise ArraysError(f"{path}: needs a non-empty 'runs' list of objects with subject and fmri and/or eeg")
    unknown = set(man) - TOP_KEYS
    if unknown:
        raise ArraysError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    for i, run in enumerate(man["runs"]):
        if not isinstance(run, dict) or not str(run.get("subject", "")).strip():
            raise ArraysError(f"{path}: runs[{i}] needs a 'subject'")
        bad = set(run) - RUN_KEYS
        if bad:
            raise ArraysError(f"{path}: runs[{i}] has unknown keys {sorted(bad)}; allowed: {sorted(RUN_KEYS)}")
        if not run.get("fmri") and not run.get("eeg"):
            raise ArraysError(f"{path}: runs[{i}] (subject {run['subject']}) has neither 'fmri' nor 'eeg'")
    return man


def _file(root: Path, rel: str, what: str) -> Path:
    p = root / rel
    if not p.is_file():
        raise FileNotFoundError(f"{root / MANIFEST}: {what} file {p} does not exist")
    return p


def _rate(run: dict, man: dict, key: str, path: Path, label: str) -> float:
    v = run.get(key, man.get(key))
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise ArraysError(f"{path}: run {label} needs '{key}' > 0 (in the run or at the top level), got {v!r}")
    return float(v)


def read_channel_table(path: Path) -> tuple[list[str], np.ndarray]:
    """``name, x, y, z`` (MNI mm) -> (names ``[C]``, positions ``[C, 3]`` in mm, 0 where unknown)."""
    rows = read_tsv(path)
    if not rows or "name" not in rows[0]:
        raise ArraysError(f"{path}: a channel table needs a header with 'name' (and x, y, z in MNI mm)")
    names = [r["name"] for r in rows]
    if len(set(names)) != len(names):
        raise ArraysError(f"{path}: duplicate channel names")

    def num(r, k):
        try:
            return float(r.get(k, "nan"))
        except ValueError:
            return float("nan")
    pos = np.array([[num(r, k) for k in "xyz"] for r in rows])
    return names, np.nan_to_num(pos)


def _read_eeg(path: Path, n_channels: int) -> np.ndarray:
    if path.suffix != ".npy":
        raise ArraysError(f"{path}: EEG arrays must be .npy [channels x samples]")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ArraysError(f"{path}: could not read ({type(exc).__name__}: {exc}); re-export it as a numeric "
                          f".npy [channels x samples]") from exc
    if x.ndim != 2 or x.shape[0] != n_channels or not np.issubdtype(x.dtype, np.number):
        raise ArraysError(f"{path}: expected a numeric [channels={n_channels} (rows of the channel table), "
                          f"samples] array, got {x.dtype} {x.shape}; save it as [channels x samples]")
    if not np.isfinite(x).all():
        raise ArraysError(f"{path}: {int((~np.isfinite(x)).sum())} NaN/Inf values; interpolate them first")
    return x.astype(np.float64)


def load_run(root: Path, man: dict, run: dict, modalities: str) -> Recording:
    """One manifest entry -> :class:`Recording` (one-modality runs in store form, see ``clock.py``)."""
    path = root / MANIFEST
    sub, ses, task, rn = (str(run.get(k, "")) for k in ("subject", "session", "task", "run"))
    label = entity_label(sub, ses, task, rn)
    use_f = bool(run.get("fmri")) and modalities != "eeg"
    use_e = bool(run.get("eeg")) and modalities != "fmri"
    if modalities == "both" and not (use_f and use_e):
        raise ArraysError(f"{path}: run {label} lacks {'eeg' if use_f else 'fmri'} but data.modalities is 'both'")
    if not (use_f or use_e):
        raise ArraysError(f"{path}: run {label} has no {modalities} array (data.modalities: {modalities})")
    meta: dict = {"source": "arrays", "manifest": str(path)}
    fmri, tr, names, rpos, mask, modules = np.zeros((0, 0)), 0.0, [], np.zeros((0, 3)), np.zeros(0, bool), None
    if use_f:
        if not man.get("regions"):
            raise ArraysError(f"{path}: runs with 'fmri' need a top-level 'regions' table (name, x, y, z in MNI mm)")
        tr = _rate(run, man, "tr", path, label)
        f = _file(root, run["fmri"], "fmri")
        ts, names, rpos, modules, mask = read_parcellated(f, _file(root, man["regions"], "regions"))
        conf = None
        if run.get("confounds"):
            conf, meta["confounds"] = load_confounds(_file(root, run["confounds"], "confounds"), ts.shape[1])
        if ts.shape[1] < 3:
            raise ArraysError(f"{f}: only {ts.shape[1]} volumes")
        fmri = (ts if man.get("preprocessed") else clean(ts, mask, conf)).astype(np.float32)
        meta["fmri_file"] = str(f)
    eeg, sfreq, ch, cpos = np.zeros((0, 0)), 0.0, [], np.zeros((0, 3))
    if use_e:
        if not man.get("channels"):
            raise ArraysError(f"{path}: runs with 'eeg' need a top-level 'channels' table (name, x, y, z in MNI mm)")
        sfreq = _rate(run, man, "eeg_sfreq", path, label)
        ch, cpos = read_channel_table(_file(root, man["channels"], "channels"))
        e = _file(root, run["eeg"], "eeg")
        x = _read_eeg(e, len(ch))
        eeg = (x if man.get("preprocessed") else robust_zscore(x)).astype(np.float32)
        meta["eeg_file"] = str(e)
    if not use_f:
        fmri, tr = np.zeros((0, eeg.shape[1]), np.float32), 1.0 / sfreq
    if not use_e:
        eeg, sfreq = np.zeros((0, fmri.shape[1]), np.float32), 1.0 / tr
    rec = Recording(subject=sub, session=ses, task=task, run=rn, eeg=eeg, eeg_sfreq=sfreq, fmri=fmri, tr=tr,
                    channel_names=ch, region_names=list(names), channel_pos=cpos, region_pos=rpos,
                    region_mask=np.asarray(mask, bool), eeg_onset_s=float(run.get("eeg_onset_s", 0.0)) if use_f
                    else 0.0, modules=modules, meta=meta)
    clock = run.get("clock")
    if clock and man.get("preprocessed"):   # a recorded cohort: the exact clock it was trained on
        if not use_f:
            fmri, tr = np.zeros((0, int(clock["n_fmri"])), np.float32), float(clock["tr"])
        if not use_e:
            eeg, sfreq = np.zeros((0, int(clock["n_eeg"])), np.float32), float(clock["eeg_sfreq"])
        rec = dataclasses.replace(rec, fmri=fmri, tr=tr, eeg=eeg, eeg_sfreq=sfreq,
                                  meta={**rec.meta, "clock": "recorded"})
    else:
        rec = native_placeholder(rec)
    rec.check(f"{path} run {label}")
    return rec


def load_arrays_cohort(cfg: Config) -> Cohort:
    """Every run of ``data.arrays_root`` (restricted to ``data.tasks``) as a :class:`Cohort`."""
    root = Path(cfg.data.arrays_root)
    man = read_manifest(root)
    runs = [r for r in man["runs"] if not cfg.data.tasks or str(r.get("task", "")) in cfg.data.tasks]
    if not runs:
        raise ArraysError(f"{root / MANIFEST}: no run has a task in data.tasks={cfg.data.tasks}")
    mode = cfg.data.modalities
    if mode == "auto":
        has = {(bool(r.get("fmri")), bool(r.get("eeg"))) for r in runs}
        if len(has) > 1:
            raise ArraysError(f"{root / MANIFEST}: runs mix modalities (some fmri, some eeg, some both); node "
                              f"slots must be the same in every run - set data.modalities to fmri or eeg")
        mode = "both" if has == {(True, True)} else "fmri" if has == {(True, False)} else "eeg"
    recs = [load_run(root, man, r, mode) for r in runs]
    keys = [r.key for r in recs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ArraysError(f"{root / MANIFEST}: runs {dup} share subject/session/task/run; give them distinct labels")
    truth = None
    if man.get("truth"):
        from twinbrain.data.simulate import load_truth  # lazy: only cohorts recorded from the simulator
        truth = load_truth(_file(root, man["truth"], "truth"))
    return Cohort(sorted(recs, key=lambda r: r.key), truth)


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename, so concurrent writers (ranks) and kills never leave a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def w(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
    _atomic_write(path, w)


def write_arrays(cohort: Cohort, root: str | Path, *, preprocessed: bool = False, fingerprint: str = "") -> Path:
    """Write ``cohort`` as an arrays folder (``.npy`` per run + tables + manifest); returns ``root``.

    ``preprocessed=True`` records the cohort exactly as it is (no cleaning on reading, the clock of every
    run kept, ground truth copied): this is how a cohort passed in memory is recorded in its run so that
    every CLI verb can rebuild it. The manifest is written last (the commit marker)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    first = cohort.recordings[0]
    man: dict = {"runs": []}
    if preprocessed:
        man.update(preprocessed=True, fingerprint=fingerprint,
                   description="cohort recorded by TwinBrain; arrays are used as they are")
    if first.fmri.shape[0]:
        rows = ["index\tname\tx\ty\tz" + ("\tmodule" if first.modules is not None else "") + "\tmask"]
        for i, n in enumerate(first.region_names):
            x, y, z = (float(v) for v in first.region_pos[i])
            mod = f"\t{int(first.modules[i])}" if first.modules is not None else ""
            rows.append(f"{i + 1}\t{n}\t{x:.6f}\t{y:.6f}\t{z:.6f}{mod}\t{int(bool(first.region_mask[i]))}")
        _atomic_write(root / "regions.tsv", lambda t: t.write_text("\n".join(rows) + "\n"))
        man["regions"] = "regions.tsv"
    if first.eeg.shape[0]:
        rows = ["name\tx\ty\tz"] + [f"{n}\t" + "\t".join(f"{float(v):.6f}" for v in p)
                                    for n, p in zip(first.channel_names, first.channel_pos)]
        _atomic_write(root / "channels.tsv", lambda t: t.write_text("\n".join(rows) + "\n"))
        man["channels"] = "channels.tsv"
    for rec in cohort.recordings:
        entry = {"subject": rec.subject, "session": rec.session, "task": rec.task, "run": rec.run}
        if rec.fmri.shape[0]:
            _save_npy(root / f"{rec.key}_bold.npy", np.asarray(rec.fmri, np.float32))
            entry.update(fmri=f"{rec.key}_bold.npy", tr=rec.tr)
        if rec.eeg.shape[0]:
            _save_npy(root / f"{rec.key}_eeg.npy", np.asarray(rec.eeg, np.float32))
            entry.update(eeg=f"{rec.key}_eeg.npy", eeg_sfreq=rec.eeg_sfreq)
            if rec.fmri.shape[0]:
                entry["eeg_onset_s"] = rec.eeg_onset_s
        if preprocessed:
            entry["clock"] = {"tr": rec.tr, "eeg_sfreq": rec.eeg_sfreq, "n_fmri": int(rec.fmri.shape[1]),
                              "n_eeg": int(rec.eeg.shape[1])}
        man["runs"].append({k: v for k, v in entry.items() if v != ""})
    if preprocessed and cohort.truth is not None:
        from twinbrain.data.simulate import save_truth
        save_truth(cohort.truth, root / "truth.npz")
        man["truth"] = "truth.npz"
    _atomic_write(root / MANIFEST, lambda t: t.write_text(json.dumps(man, indent=1) + "\n"))
    return root
