"""Bad input gives a clear error naming the file and the fix, and never a store entry."""
from __future__ import annotations

import json

import mne
import numpy as np
import pytest

from tests.bids_synth import make_config, make_recording, tiny_atlas, write_bold, write_dataset
from twinbrain.data.prepare import PrepareError, load_prepared_cohort, prepare
from twinbrain.data.store import Store

RUN = "sub-01/ses-1/{}/sub-01_ses-1_task-rest_run-1_{}"


def _dataset(tmp_path, **kw):
    """Run sub-01 (to be broken by the test) and a good run sub-02."""
    root = write_dataset(tmp_path / "bids", [make_recording("01", n_vols=12, **kw),
                                             make_recording("02", n_vols=12, seed=1)])
    return root, make_config(root, tmp_path / "store")


def _fails(cfg, *patterns):
    """prepare raises naming the broken run's file; the good run is stored, the bad one is not."""
    with pytest.raises(PrepareError) as err:
        prepare(cfg, progress=False)
    msg = str(err.value)
    for pat in patterns:
        assert pat in msg, f"{pat!r} not in:\n{msg}"
    keys = Store(cfg.data.store_dir).keys()
    assert len(keys) == 1 and keys[0].startswith("sub-02_")
    return msg


def test_missing_fmri_sidecar(tmp_path):
    root, cfg = _dataset(tmp_path)
    (root / RUN.format("func", "bold.json")).unlink()
    _fails(cfg, "sub-01_ses-1_task-rest_run-1_bold.tsv", "no JSON sidecar with RepetitionTime", "add one")


def test_tr_mismatch_between_sidecar_and_nifti_header(tmp_path):
    root, _ = _dataset(tmp_path)
    apath, table, lab, aff = tiny_atlas(tmp_path / "atlas")
    for sub, header_tr in (("01", 3.0), ("02", 2.0)):
        write_bold(root / f"sub-{sub}/ses-1/func/sub-{sub}_ses-1_task-rest_run-1_space-MNI_bold.nii.gz",
                   lab, aff, 12, 2.0, header_tr=header_tr)
    cfg = make_config(root, tmp_path / "store", atlas=str(apath), atlas_labels=str(table))
    _fails(cfg, "space-MNI_bold.nii.gz: TR mismatch", "header says 3.0 s", "RepetitionTime 2.0 s")


def test_nan_in_fmri_and_eeg(tmp_path):
    root, cfg = _dataset(tmp_path)
    path = root / RUN.format("func", "bold.tsv")
    lines = path.read_text().splitlines()
    lines[3] = "\t".join(["nan"] + lines[3].split("\t")[1:])
    path.write_text("\n".join(lines) + "\n")
    _fails(cfg, "run-1_bold.tsv: 1 NaN/Inf values", "interpolate")

    root, cfg = _dataset(tmp_path / "b2")
    path = root / RUN.format("eeg", "eeg.fif")
    raw = mne.io.read_raw_fif(path, preload=True, verbose="error")
    raw._data[1, 100] = np.nan
    raw.save(path, overwrite=True, verbose="error")
    _fails(cfg, "run-1_eeg.fif: EEG contains NaN/Inf")


def test_eeg_shorter_than_fmri_run(tmp_path):
    root, cfg = _dataset(tmp_path)
    sidecar = root / RUN.format("func", "bold.json")
    path = root / RUN.format("func", "bold.tsv")
    lines = path.read_text().splitlines()    # 6 more volumes than the EEG covers
    path.write_text("\n".join(lines + lines[1:7]) + "\n")
    assert json.loads(sidecar.read_text())["RepetitionTime"] == 2.0
    _fails(cfg, "run-1_eeg.fif: EEG covers", "EEG shorter than the fMRI run", "run-1_bold.tsv")


def test_too_few_channels(tmp_path):
    rec = make_recording("01", n_channels=2, n_vols=12)
    rec.channel_names = ["Cz", "ECG"]
    root = write_dataset(tmp_path / "bids", [rec, make_recording("02", n_vols=12, seed=1)])
    (root / RUN.format("eeg", "channels.tsv")).unlink()   # ECG then recognised by its name
    _fails(make_config(root, tmp_path / "store"), "run-1_eeg.fif: only 1 usable EEG channel", "channels.tsv")


def test_unknown_atlas_labels_fail_before_any_run(tmp_path):
    root, _ = _dataset(tmp_path)
    apath, table, lab, aff = tiny_atlas(tmp_path / "atlas", extra_label=7)
    write_bold(root / RUN.format("func", "space-MNI_bold.nii.gz"), lab, aff, 12, 2.0)
    cfg = make_config(root, tmp_path / "store", atlas=str(apath), atlas_labels=str(table))
    with pytest.raises(ValueError, match=r"space-MNI_atlas-tiny_dseg.nii.gz: labels \[7\] are not in"):
        prepare(cfg, progress=False)
    assert not Store(tmp_path / "store").keys()


@pytest.mark.parametrize("what", ["fif", "edf", "npy", "nifti"])
def test_truncated_files(tmp_path, what):
    kw = {"eeg_format": "edf"} if what == "edf" else {"fmri_format": "npy"} if what == "npy" else {}
    root = write_dataset(tmp_path / "bids", [make_recording("01", n_vols=12),
                                             make_recording("02", n_vols=12, seed=1)], **kw)
    extra = {}
    if what == "nifti":
        apath, table, lab, aff = tiny_atlas(tmp_path / "atlas")
        for sub in ("01", "02"):
            write_bold(root / f"sub-{sub}/ses-1/func/sub-{sub}_ses-1_task-rest_run-1_space-MNI_bold.nii.gz",
                       lab, aff, 12, 2.0)
        extra = {"atlas": str(apath), "atlas_labels": str(table)}
    name = {"fif": ("eeg", "eeg.fif"), "edf": ("eeg", "eeg.edf"), "npy": ("func", "bold.npy"),
            "nifti": ("func", "space-MNI_bold.nii.gz")}[what]
    path = root / RUN.format(*name)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    _fails(make_config(root, tmp_path / "store", **extra), path.name, "truncated")


def test_prepare_without_pairs_explains(tmp_path):
    """Both modalities exist but nothing pairs: the pair_map hint, and the one-modality way out."""
    root = write_dataset(tmp_path / "bids", [make_recording("01", n_vols=12), make_recording("02", n_vols=12)])
    (root / RUN.format("eeg", "eeg.fif")).unlink()
    (root / "sub-02/ses-1/func/sub-02_ses-1_task-rest_run-1_bold.tsv").unlink()
    with pytest.raises(PrepareError, match=r"(?s)no paired EEG-fMRI runs found.*has no EEG run.*pair_map"
                                           r".*data.modalities: fmri \| eeg.*expected BIDS layout"):
        load_prepared_cohort(make_config(root, tmp_path / "store"))


def test_empty_or_non_bids_folder_names_the_layout(tmp_path):
    for folder in (tmp_path / "empty", tmp_path / "flat"):
        folder.mkdir()
    np.save(tmp_path / "flat" / "bold.npy", np.zeros((3, 10)))   # data, but not in a BIDS layout
    for folder in (tmp_path / "empty", tmp_path / "flat"):
        with pytest.raises(PrepareError, match=r"(?s)no EEG or fMRI runs found.*expected BIDS layout.*"
                                               r"sub-<label>.*data.source: arrays"):
            prepare(make_config(folder, tmp_path / "store"), progress=False)


@pytest.mark.parametrize("key", ["data.atlas", "graph.structural"])
def test_missing_config_files_fail_at_prepare(tmp_path, key):
    root, _ = _dataset(tmp_path)
    missing = tmp_path / "nope" / "file.nii.gz"
    section, name = key.split(".")
    over = {"data": {"source": "bids", "bids_root": str(root), "store_dir": str(tmp_path / "store"),
                     "atlas_labels": str(tmp_path / "labels.tsv")}, "logging": {"progress": "off"}}
    over.setdefault(section, {})[name] = str(missing)
    if key == "graph.structural":
        del over["data"]["atlas_labels"]
    from twinbrain.config import load_config
    with pytest.raises(PrepareError, match=f"{key} file {missing} does not exist"):
        prepare(load_config(overrides=over), progress=False)
    assert not Store(tmp_path / "store").keys()


def test_volume_markers_contradicting_tr(tmp_path):
    root, cfg = _dataset(tmp_path)
    (root / RUN.format("func", "bold.json")).write_text(json.dumps({"RepetitionTime": 1.0}))
    _fails(cfg, "run-1_eeg.fif: volume markers are 2.0000 s apart but RepetitionTime is 1.0 s",
           "data.volume_marker")
