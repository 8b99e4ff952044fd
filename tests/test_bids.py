"""BIDS discovery, pairing, sidecars and EEG preprocessing/synchronisation on generated datasets."""
from __future__ import annotations

import warnings

import mne
import numpy as np
import pytest
from tests.bids_synth import make_config, make_recording, write_dataset, write_json

from twinbrain.data.bids import discover, parse_bids_name
from twinbrain.data.eeg import load_eeg, robust_zscore
from twinbrain.data.prepare import load_prepared_cohort, prepare

mne.set_log_level("ERROR")


def test_parse_bids_name():
    f = parse_bids_name("sub-01_ses-2_task-rest_run-01_bold.nii.gz")
    assert dict(f.entities) == {"sub": "01", "ses": "2", "task": "rest", "run": "01"}
    assert (f.suffix, f.ext) == ("bold", ".nii.gz")
    assert parse_bids_name("my_notes.txt") is None and parse_bids_name("regions.tsv").suffix == "regions"


def test_discovery_pairs_runs_and_reports_skipped(tmp_path):
    root = tmp_path / "bids"
    write_dataset(root, [make_recording("01"), make_recording("02", run="2"),
                         make_recording("03", task="motor")])
    (root / "sub-02/ses-1/func/sub-02_ses-1_task-rest_run-2_bold.tsv").unlink()     # orphan EEG
    (root / "sub-01/ses-1/eeg/sub-01_ses-1_task-rest_run-1_eeg.fif").rename(
        root / "sub-01/ses-1/eeg/sub-01_ses-1_task-rest_run-1_eeg.xyz")             # unsupported -> orphan fMRI
    rep = discover(root, tasks=["rest", "motor"])
    assert [p.key for p in rep.found] == ["sub-03_ses-1_task-motor_run-1"]
    pair = rep.found[0]
    assert pair.fmri_kind == "table" and pair.regions.name.endswith("_regions.tsv")
    assert pair.eeg_sidecar.name.endswith("_eeg.json") and pair.channels.name.endswith("_channels.tsv")
    reasons = {s.what: s.reason for s in rep.skipped}
    assert "has no fMRI run" in reasons["sub-02_ses-1_task-rest_run-2"]
    assert "has no EEG run" in reasons["sub-01_ses-1_task-rest_run-1"]
    text = rep.summary()
    assert "1 paired EEG-fMRI runs" in text and "2 skipped" in text and "sub-02" in text
    only_rest = discover(root, tasks=["rest"])
    assert not only_rest.found and any("not in data.tasks" in s.reason for s in only_rest.skipped)


def test_pair_map_and_run_padding(tmp_path):
    root = tmp_path / "bids"
    write_dataset(root, [make_recording("01", run="01")])
    eeg_dir = root / "sub-01/ses-1/eeg"
    for p in list(eeg_dir.iterdir()):   # EEG task label differs from fMRI, runs 1 vs 01
        p.rename(eeg_dir / p.name.replace("task-rest_run-01", "task-eegrest_run-1"))
    assert not discover(root).found
    rep = discover(root, pair_map=["task-eegrest=rest"])
    assert [p.key for p in rep.found] == ["sub-01_ses-1_task-rest_run-01"]
    with pytest.raises(ValueError, match="ENTITY-EEGVALUE=FMRIVALUE"):
        discover(root, pair_map=["eegrest:rest"])


def test_derivative_eeg_wins_over_raw(tmp_path):
    root = tmp_path / "bids"
    write_dataset(root, [make_recording("01")])
    write_dataset(root / "derivatives" / "cleaned", [make_recording("01", seed=5)])
    pair = discover(root).found[0]
    assert "derivatives" in pair.eeg.parts and "derivatives" in pair.fmri.parts


def test_tr_and_sfreq_from_sidecars(tmp_path):
    root = tmp_path / "bids"
    write_dataset(root, [make_recording("01", tr=1.5, sfreq=500.0, n_vols=20)])
    cfg = make_config(root, tmp_path / "store", eeg_sfreq=250.0)
    rec = load_prepared_cohort(cfg).recordings[0]
    assert rec.tr == 1.5 and rec.eeg_sfreq == 250.0 and rec.meta["eeg_sfreq_raw"] == 500.0
    assert rec.eeg.shape == (4, int(20 * 1.5 * 250)) and rec.fmri.shape == (5, 20)
    assert rec.eeg_onset_s == 0.0
    # A sidecar that contradicts the file is refused, naming the sidecar.
    side = root / "sub-01/ses-1/eeg/sub-01_ses-1_task-rest_run-1_eeg.json"
    write_json(side, {"SamplingFrequency": 1000.0})
    with pytest.raises(Exception, match="SamplingFrequency 1000.0"):
        prepare(cfg, progress=False)


def _expected(rec, lead_s, l_freq=1.0, h_freq=40.0):
    """Reference pipeline applied directly to the known signal, cut at the known offset."""
    x = mne.filter.filter_data(rec.eeg, rec.eeg_sfreq, l_freq, h_freq, phase="minimum", pad="edge",
                               fir_design="firwin", verbose="error")
    x = x - x.mean(0, keepdims=True)
    start = int(round(lead_s * rec.eeg_sfreq))
    return robust_zscore(x[:, start:start + rec.fmri.shape[1] * int(rec.tr * rec.eeg_sfreq)])


@pytest.mark.parametrize("fmt", ["fif", "edf", "brainvision"])
def test_volume_markers_recover_known_offset(tmp_path, fmt):
    root = tmp_path / "bids"
    rec = make_recording("01", lead_s=3.2, n_vols=20)
    write_dataset(root, [rec], eeg_format=fmt)
    out = load_prepared_cohort(make_config(root, tmp_path / "store")).recordings[0]
    assert out.meta["sync"] == "volume_markers" and out.meta["marker"] == "R128"
    assert out.meta["onset_raw_s"] == pytest.approx(-3.2, abs=1e-6)
    exp = _expected(rec, 3.2)
    assert out.eeg.shape == exp.shape
    # Same samples: correlation ~1 at lag 0 (EDF quantises to 16 bit).
    r = [np.corrcoef(out.eeg[c], exp[c])[0, 1] for c in range(4)]
    assert min(r) > 0.999
    shifted = np.corrcoef(out.eeg[0, 5:], exp[0, :-5])[0, 1]
    assert shifted < 0.9


def test_custom_marker_and_fallback_warning(tmp_path):
    root = tmp_path / "bids"
    write_dataset(root, [make_recording("01", lead_s=2.0, n_vols=20)], marker="Volume7")
    with pytest.warns(UserWarning, match="no scanner volume markers"):
        rec = load_prepared_cohort(make_config(root, tmp_path / "s1")).recordings[0]
    assert rec.meta["sync"] == "none"
    rec = load_prepared_cohort(make_config(root, tmp_path / "s2", volume_marker="Volume7")).recordings[0]
    assert rec.meta["sync"] == "volume_markers" and rec.meta["onset_raw_s"] == pytest.approx(-2.0)


def test_scans_tsv_onset_when_no_markers(tmp_path):
    root = tmp_path / "bids"
    write_dataset(root, [make_recording("01", lead_s=3.0, n_vols=20)], marker="nothing")
    (root / "sub-01/ses-1/sub-01_ses-1_scans.tsv").write_text(
        "filename\tacq_time\n"
        "eeg/sub-01_ses-1_task-rest_run-1_eeg.fif\t2020-01-01T10:00:00\n"
        "func/sub-01_ses-1_task-rest_run-1_bold.tsv\t2020-01-01T10:00:03\n")
    with pytest.warns(UserWarning, match="acq_time in scans.tsv"):
        rec = load_prepared_cohort(make_config(root, tmp_path / "store")).recordings[0]
    assert rec.meta["sync"] == "acq_time" and rec.meta["onset_raw_s"] == pytest.approx(-3.0)


def test_non_eeg_channels_dropped_and_recorded(tmp_path):
    root = tmp_path / "bids"
    rec = make_recording("01", n_channels=5, n_vols=15)
    rec.channel_names = ["Fz", "Cz", "Pz", "ECG", "HEOG"]
    write_dataset(root, [rec], eeg_format="edf")   # EDF stores no channel types
    tsv = root / "sub-01/ses-1/eeg/sub-01_ses-1_task-rest_run-1_channels.tsv"
    tsv.write_text("name\ttype\tunits\tstatus\nFz\tEEG\tV\tgood\nCz\tEEG\tV\tgood\nPz\tEEG\tV\tbad\n"
                   "ECG\tECG\tV\tgood\nHEOG\tEOG\tV\tgood\n")
    out = load_prepared_cohort(make_config(root, tmp_path / "s1")).recordings[0]
    assert out.channel_names == ["Fz", "Cz"]
    assert out.meta["dropped_channels"] == {"ecg": ["ECG"], "eog": ["HEOG"], "bad": ["Pz"]}
    tsv.unlink()                                   # without channels.tsv: types from channel names
    out = load_prepared_cohort(make_config(root, tmp_path / "s2")).recordings[0]
    assert out.channel_names == ["Fz", "Cz", "Pz"]
    assert out.meta["dropped_channels"] == {"ecg": ["ECG"], "eog": ["HEOG"]}


def test_template_positions_with_warning_for_unknown(tmp_path):
    root = tmp_path / "bids"
    rec = make_recording("01", n_channels=4, n_vols=15)
    rec.channel_names = ["Fz", "Cz", "Pz", "X9"]
    rec.channel_pos = np.zeros((4, 3))
    write_dataset(root, [rec], eeg_format="edf")
    (root / "sub-01/ses-1/eeg/sub-01_ses-1_task-rest_run-1_electrodes.tsv").unlink()
    with pytest.warns(UserWarning, match="1 EEG channel.*no position.*X9"):
        out = load_prepared_cohort(make_config(root, tmp_path / "store")).recordings[0]
    assert out.meta["positions"] == "template" and out.meta["channels_without_position"] == ["X9"]
    assert np.linalg.norm(out.channel_pos[:3], axis=1).min() > 50 and not out.channel_pos[3].any()   # mm


def test_eeg_pipeline_is_causal(tmp_path):
    """Inputs equal up to t0 give outputs equal (up to the per-channel z-score) before t0."""
    outs = []
    for k, seed in enumerate((1, 2)):
        rec = make_recording("01", n_vols=20, lead_s=3.0, seed=0)
        t0 = int(30 * rec.eeg_sfreq)                  # 27 s after volume 0
        rec.eeg[:, t0:] = np.random.default_rng(seed).standard_normal((4, rec.eeg.shape[1] - t0)) * 1e-5
        path = write_dataset(tmp_path / f"b{k}", [rec]) / "sub-01/ses-1/eeg/sub-01_ses-1_task-rest_run-1_eeg.fif"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs.append(load_eeg(path, tr=2.0, n_vols=20, l_freq=1.0, h_freq=40.0, sfreq_out=250.0))
    cut = int(27 * 250)
    a, b = outs[0].data[:, :cut], outs[1].data[:, :cut]
    assert not np.allclose(outs[0].data[:, cut + 10:], outs[1].data[:, cut + 10:])
    for c in range(4):
        assert np.corrcoef(a[c], b[c])[0, 1] > 1 - 1e-6


def test_flat_reference_channel_dropped(tmp_path):
    rec = make_recording("01", n_channels=4, n_vols=10)
    rec.eeg[3] = 0.0
    root = write_dataset(tmp_path / "bids", [rec])
    with pytest.warns(UserWarning, match=r"dropped flat EEG channel\(s\) \['Oz'\]"):
        out = load_prepared_cohort(make_config(root, tmp_path / "store")).recordings[0]
    assert out.channel_names == ["Fz", "Cz", "Pz"] and out.meta["dropped_channels"] == {"flat": ["Oz"]}
