"""BIDS root -> store entries (``twinbrain prepare``) and store -> :class:`Cohort`.

``prepare`` discovers and pairs runs, then preprocesses each one that is not in the store yet
(resumable: a run whose key exists is skipped; an interrupted run leaves no entry). A run's key is
``<run id>-<hash>`` where the hash covers every parameter that changes its content (EEG/fMRI
preprocessing, atlas content, pairing, store schema) and the size/mtime of each of its source files.
The store holds no graphs (they are built from the runs when a DataModule is set up), so ``graph.*``
is not part of the key. Runs that fail are reported with the file and the fix; the
others are still prepared, so fixing one file and re-running only redoes that run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from twinbrain.config import Config, resolve_store_dir
from twinbrain.data.bids import (EXPECTED_LAYOUT, DiscoveryReport, RunPair, acq_time_offset, discarded_volumes,
                                 discover, parse_bids_name, repetition_time)
from twinbrain.data.bids_io import TRUTH_FILE
from twinbrain.data.clock import native_placeholder
from twinbrain.data.eeg import load_eeg, load_eeg_alone
from twinbrain.data.fmri import DEFAULT_CONFOUNDS, Atlas, find_label_table, load_atlas, load_fmri
from twinbrain.data.store import SCHEMA_VERSION, Store, file_fingerprint, file_sha256, params_hash
from twinbrain.data.types import Cohort, Recording

FAILED_FILE = ".prepare-failures.json"  # run id -> error of its last failed prepare

# Names of the steps, so a change of method (not only of a number) changes every key.
EEG_PIPELINE = "pick-eeg|fir-minimum-phase-bandpass|average-ref|linear-resample-on-fmri-clock|median-iqr-z"
FMRI_PIPELINE = "nilearn-masker:resample-to-bold|labels-mean-live-voxels|maps-lstsq|linear-detrend+confounds|z"


class PrepareError(RuntimeError):
    """Some runs could not be prepared; the message lists each file and its fix."""


@dataclass
class PrepareReport:
    discovery: DiscoveryReport
    store_dir: Path
    entries: dict[str, str] = field(default_factory=dict)   # run id -> store key (ready runs)
    prepared: list[str] = field(default_factory=list)       # run ids built now
    cached: list[str] = field(default_factory=list)         # run ids already in the store
    failed: list[tuple[str, str]] = field(default_factory=list)   # (run id, error)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (run id, warning)

    def summary(self) -> str:
        lines = [self.discovery.summary(),
                 f"store {self.store_dir}: {len(self.prepared)} prepared, {len(self.cached)} already cached, "
                 f"{len(self.failed)} failed"]
        lines += [f"  ! {k}: {w}" for k, w in self.warnings]
        lines += [f"  x {k}: {e}" for k, e in self.failed]
        return "\n".join(lines)


def _sha_if_file(path: str) -> str:
    return file_sha256(path) if path and Path(path).is_file() else ""


def _label_table(d) -> str:
    """The atlas label table in use: data.atlas_labels, else the one shipped beside data.atlas."""
    if d.atlas_labels or not d.atlas or not Path(d.atlas).is_file():
        return d.atlas_labels
    found = find_label_table(Path(d.atlas))
    return str(found) if found else ""


def preprocessing_params(cfg: Config) -> dict:
    """Flat dict of everything that changes a prepared run (hashed into the key); no ``graph.*``: the
    store holds no graphs."""
    d = cfg.data
    params = {
        "schema": SCHEMA_VERSION,
        "dataset": str(Path(d.bids_root).resolve()) if d.bids_root else "",
        "pair_map": sorted(d.pair_map), "modalities": d.modalities,
        "eeg.pipeline": EEG_PIPELINE, "eeg.sfreq": d.eeg_sfreq, "eeg.l_freq": d.eeg_l_freq,
        "eeg.h_freq": d.eeg_h_freq, "eeg.volume_marker": d.volume_marker,
        "fmri.pipeline": FMRI_PIPELINE, "fmri.confounds": list(DEFAULT_CONFOUNDS),
        "fmri.atlas": Path(d.atlas).name if d.atlas else "",
        "fmri.atlas_sha256": _sha_if_file(d.atlas), "fmri.atlas_labels_sha256": _sha_if_file(_label_table(d)),
    }
    return params


def run_key(pair: RunPair, params: dict, root: Path) -> tuple[str, list[dict]]:
    """Store key of one run and the source fingerprints it covers."""
    sources = [file_fingerprint(p, root) for p in pair.sources()]
    return f"{pair.key}-{params_hash({'params': params, 'sources': sources})[:16]}", sources


def prepare_run(pair: RunPair, cfg: Config, atlas: Atlas | None, root: Path) -> Recording:
    """Preprocess one run (EEG-fMRI pair, fMRI-only or EEG-only) into a :class:`Recording` (raises
    ValueError naming the file). A one-modality run is returned in its store form
    (:func:`twinbrain.data.clock.native_placeholder`)."""
    d = cfg.data
    eeg_kw = dict(l_freq=d.eeg_l_freq, h_freq=d.eeg_h_freq, sfreq_out=d.eeg_sfreq, sidecar=pair.eeg_sidecar,
                  channels=pair.channels, electrodes=pair.electrodes, coordsystem=pair.coordsystem)
    fm = ee = None
    if pair.fmri is not None:
        tr = repetition_time(pair)
        fm = load_fmri(pair.fmri, pair.fmri_kind, tr=tr, atlas=atlas, sidecar=pair.fmri_sidecar,
                       regions=pair.regions, confounds=pair.confounds)
        if pair.eeg is not None:
            ee = load_eeg(pair.eeg, tr=tr, n_vols=fm.data.shape[1], marker=d.volume_marker,
                          discarded=discarded_volumes(pair), fallback_onset_s=acq_time_offset(pair, root),
                          fmri_source=pair.fmri, **eeg_kw)
    else:
        ee = load_eeg_alone(pair.eeg, **eeg_kw)
    empty = np.zeros((0, 3), np.float32)
    rec = Recording(subject=pair.subject, session=pair.session, task=pair.task, run=pair.run,
                    eeg=ee.data if ee else np.zeros((0, fm.data.shape[1]), np.float32),
                    eeg_sfreq=ee.sfreq if ee else 1.0 / fm.tr,
                    fmri=fm.data if fm else np.zeros((0, ee.data.shape[1]), np.float32),
                    tr=fm.tr if fm else 1.0 / ee.sfreq, channel_names=ee.ch_names if ee else [],
                    region_names=fm.names if fm else [], channel_pos=ee.pos if ee else empty,
                    region_pos=fm.pos if fm else empty, region_mask=fm.mask if fm else np.zeros(0, bool),
                    eeg_onset_s=ee.onset_s if ee else 0.0, modules=fm.modules if fm else None,
                    meta={**(fm.meta if fm else {}), **(ee.meta if ee else {}), "modalities": list(pair.modalities)})
    rec = native_placeholder(rec)
    rec.check(str(pair.fmri or pair.eeg))
    return rec


def check_files(cfg: Config) -> None:
    """Files named in the config must exist: refuse at ``prepare``, before any run is read."""
    for key, path in (("data.atlas", cfg.data.atlas), ("data.atlas_labels", cfg.data.atlas_labels),
                      ("graph.structural", cfg.graph.structural)):
        if path and not Path(path).is_file():
            raise PrepareError(f"{key} file {path} does not exist; fix the path (or clear {key})")


def _progress_on(cfg: Config) -> bool:
    mode = cfg.logging.progress
    return mode in ("bar", "lines") or (mode == "auto" and sys.stderr.isatty())


def prepare(cfg: Config, progress: bool = True, skip_bad: bool = False) -> PrepareReport:
    """Prepare every paired run of ``cfg.data.bids_root`` into ``resolve_store_dir(cfg)``.

    Raises :class:`PrepareError` after trying all runs if any failed (unless ``skip_bad``); the runs
    that succeeded stay in the store, so a re-run only redoes the failed ones.
    """
    from tqdm.auto import tqdm
    d = cfg.data
    if not d.bids_root:
        raise PrepareError("data.bids_root is empty; set it to the BIDS dataset to prepare")
    root = Path(d.bids_root)
    check_files(cfg)
    atlas_ent = parse_bids_name(d.atlas) if d.atlas else None
    report = PrepareReport(discover(root, tasks=d.tasks, pair_map=d.pair_map,
                                    prefer="nifti" if d.atlas else "table",
                                    atlas_space=atlas_ent.get("space") if atlas_ent else "",
                                    modalities=d.modalities),
                           resolve_store_dir(cfg))
    if not report.discovery.found:
        disc = report.discovery
        hint = ""
        if disc.mode == "both" and disc.skipped:
            hint = ("\nboth modalities exist but no run pairs; fix the labels (data.pair_map) or use one "
                    "modality alone (data.modalities: fmri | eeg)")
        what = disc.kind if disc.skipped else "EEG or fMRI"
        raise PrepareError(f"no {what} runs found under {root}.\n{disc.summary()}{hint}\n{EXPECTED_LAYOUT}")
    store = Store(report.store_dir)
    params = preprocessing_params(cfg)
    truth = _copy_truth(root, store, params)
    keyed = [(pair, *run_key(pair, params, root)) for pair in report.discovery.found]
    # The atlas is shared by all runs: a bad atlas is one error, raised before any run is tried.
    atlas: Atlas | None = None
    if d.atlas and any(key not in store for _, key, _ in keyed):
        atlas = load_atlas(d.atlas, d.atlas_labels)
    for pair, key, sources in tqdm(keyed, desc="prepare", unit="run", disable=not progress):
        if key in store:
            report.cached.append(pair.key)
            report.entries[pair.key] = key
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rec = prepare_run(pair, cfg, atlas, root)
            report.warnings += [(pair.key, str(w.message)) for w in caught if _ours(w)]
            store.put(key, rec, {"params": params, "sources": sources, "truth": truth})
        except (ValueError, OSError) as exc:
            report.failed.append((pair.key, str(exc)))
            continue
        report.prepared.append(pair.key)
        report.entries[pair.key] = key
        for old in _superseded(store, pair, key, params):  # same run and params, older source files
            store.remove(old)
    for run, msg in report.warnings:
        warnings.warn(f"{run}: {msg}", stacklevel=2)
    # Failed runs are recorded in the store, so training from it can announce an older entry it falls back on.
    failed = {k: v for k, v in _failed_runs(store).items() if k not in report.entries} | dict(report.failed)
    store.root.mkdir(parents=True, exist_ok=True)
    (store.root / FAILED_FILE).write_text(json.dumps(failed, indent=1))
    if report.failed and not skip_bad:
        raise PrepareError(f"{len(report.failed)} run(s) could not be prepared:\n{report.summary()}")
    return report


def _ours(w: warnings.WarningMessage) -> bool:
    """Keep our own data warnings in the report, not library deprecation noise."""
    return issubclass(w.category, UserWarning) and "twinbrain" in str(w.filename)


def _superseded(store: Store, pair: RunPair, key: str, params: dict) -> list[str]:
    """Entries of the same run built with the same parameters from older versions of its files."""
    same_run = [k for k in store.keys() if k != key and k.rsplit("-", 1)[0] == pair.key]
    return [k for k in same_run if store.info(k).get("params") == store.info(key).get("params")]


def _copy_truth(root: Path, store: Store, params: dict) -> str:
    """Copy the dataset's ground truth (``truth.npz`` + ``truth.json``) into the store, atomically per
    file, so cache-only runs have it; returns the stem name in the store ('' when there is none)."""
    stem = Path(TRUTH_FILE).stem
    srcs = [root / f"{stem}.npz", root / f"{stem}.json"]
    if not all(p.is_file() for p in srcs):
        return ""
    name = f"truth-{params_hash([file_sha256(p) for p in srcs])[:16]}"
    store.root.mkdir(parents=True, exist_ok=True)
    for src in srcs:
        dst = store.root / f"{name}{src.suffix}"
        if dst.is_file():
            continue
        tmp = store.root / f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
    return name


def _load_truth(store: Store, names: set[str]):
    names.discard("")
    if not names:
        return None
    if len(names) > 1:
        warnings.warn(f"store {store.root}: runs carry different ground truths {sorted(names)}; none loaded",
                      stacklevel=3)
        return None
    from twinbrain.data.simulate import load_truth  # lazy: only datasets written from the simulator
    return load_truth(store.root / names.pop())


def _offline_ignore(cfg: Config) -> set[str]:
    """Parameters a cache-only node cannot recompute (files absent there) and so does not compare, and
    the ``graph.*`` parameters that entries prepared before the key left them out still carry (they never
    changed what the store holds)."""
    d = cfg.data
    ignore = {f"graph.{f.name}" for f in dataclasses.fields(cfg.graph)} | {"graph.structural_sha256"}
    if not d.bids_root:
        ignore.add("dataset")
    if d.atlas and not Path(d.atlas).is_file():
        ignore.add("fmri.atlas_sha256")
    if d.atlas_labels and not Path(d.atlas_labels).is_file():
        ignore.add("fmri.atlas_labels_sha256")
    return ignore


def load_prepared_cohort(cfg: Config) -> Cohort:
    """Cohort for ``data.source`` 'bids' (prepare what is missing, then load) or 'store' (cache only)."""
    d = cfg.data
    store = Store(resolve_store_dir(cfg))
    if d.source == "bids":
        report = prepare(cfg, progress=_progress_on(cfg))
        keys = list(report.entries.values())
    elif d.source == "store":
        if not store.keys():
            raise FileNotFoundError(f"store {store.root} has no prepared runs; run `twinbrain prepare` with "
                                    f"data.bids_root set (or point data.store_dir at a prepared store)")
        params, ignore = preprocessing_params(cfg), _offline_ignore(cfg)
        keys = store.find(params, ignore)
        if not keys:
            near, diff = store.closest_mismatch(params, ignore)
            raise FileNotFoundError(f"store {store.root} has {len(store.keys())} runs, none prepared with the "
                                    f"current parameters (closest, {near}, differs in: {', '.join(diff)}); "
                                    f"re-run `twinbrain prepare` with this config or restore those values")
        keys = _latest_per_run(store, keys, d.tasks)
        failed = _failed_runs(store)
        for k in keys:
            if k.rsplit("-", 1)[0] in failed:
                warnings.warn(f"store {store.root}: the last prepare of {k.rsplit('-', 1)[0]} failed "
                              f"({failed[k.rsplit('-', 1)[0]][:200]}); using its older entry {k}, built from "
                              "earlier source files. Fix the run and re-run `twinbrain prepare`", stacklevel=2)
    else:
        raise ValueError(f"load_prepared_cohort: data.source must be 'bids' or 'store', got '{d.source}'")
    # Signals are memory-mapped: a process holds only the windows it reads (twinbrain.data.mapped).
    recs = sorted((store.get(k, mmap=True) for k in keys), key=lambda r: r.key)
    if not recs:
        raise FileNotFoundError(f"store {store.root}: no runs for data.tasks={d.tasks}")
    first = recs[0]
    for r in recs[1:]:
        if r.region_names != first.region_names:
            raise ValueError(f"{r.key} and {first.key} have different region sets; node identity must be "
                             f"fixed - parcellate every run with the same atlas / region table")
        r.region_names = first.region_names          # one list per cohort, not one per run
        if r.channel_names == first.channel_names:
            r.channel_names = first.channel_names
    truth = _load_truth(store, {store.info(k).get("truth", "") for k in keys})
    return Cohort(recs, truth)


def _failed_runs(store: Store) -> dict[str, str]:
    """Runs whose last ``prepare`` failed -> the error (from ``FAILED_FILE`` in the store)."""
    try:
        return json.loads((store.root / FAILED_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _latest_per_run(store: Store, keys: list[str], tasks: list[str]) -> list[str]:
    """One key per run id (newest wins), restricted to ``tasks`` when given."""
    by_run: dict[str, str] = {}
    for k in keys:
        info = store.info(k)
        if tasks and info["task"] not in tasks:
            continue
        run = k.rsplit("-", 1)[0]
        if run not in by_run or (store.root / f"{k}.json").stat().st_mtime_ns > \
                (store.root / f"{by_run[run]}.json").stat().st_mtime_ns:
            by_run[run] = k
    return sorted(by_run.values())
