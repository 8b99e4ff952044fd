"""Simulated cohort -> BIDS derivative -> prepare -> load: same layout, names, TR and ground truth."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import detrend

from tests.bids_synth import make_config
from twinbrain.config import load_config
from twinbrain.data.bids_io import write_cohort_bids
from twinbrain.data.prepare import load_prepared_cohort

simulate = pytest.importorskip("twinbrain.data.simulate")


@pytest.mark.parametrize("eeg_format,fmri_format", [("fif", "tsv"), ("brainvision", "npy")])
def test_simulated_cohort_roundtrip(tmp_path, eeg_format, fmri_format):
    sim = load_config(overrides={"sim": {"n_subjects": 3, "minutes": 1.0, "n_regions": 10, "n_channels": 8,
                                         "n_modules": 2, "n_perturb": 1},
                                 "data": {"window_s": 20.0, "stride_s": 10.0},
                                 "graph": {"k_fmri": 3, "k_eeg": 3}}).sim
    cohort = simulate.simulate_cohort(sim)
    root = write_cohort_bids(cohort, tmp_path / "bids", eeg_format=eeg_format, fmri_format=fmri_format)
    cfg = make_config(root, tmp_path / "store", eeg_sfreq=sim.eeg_sfreq)
    back = load_prepared_cohort(cfg)
    assert [r.key for r in back.recordings] == [r.key for r in cohort.recordings]
    for a, b in zip(cohort.recordings, back.recordings):
        assert b.eeg.shape == a.eeg.shape and b.fmri.shape == a.fmri.shape
        assert b.channel_names == a.channel_names and b.region_names == a.region_names
        assert b.tr == a.tr and b.eeg_sfreq == a.eeg_sfreq and b.eeg_onset_s == a.eeg_onset_s == 0.0
        assert b.meta["sync"] == "volume_markers"
        np.testing.assert_allclose(b.channel_pos, a.channel_pos, atol=1e-5)
        np.testing.assert_allclose(b.region_pos, a.region_pos, atol=1e-5)
        np.testing.assert_array_equal(b.modules, a.modules)
        np.testing.assert_array_equal(b.region_mask, a.region_mask)
        # Preprocessed BOLD is the linearly detrended original (z-scored).
        ref = detrend(a.fmri.astype(np.float64), axis=1)
        r = [np.corrcoef(ref[i], b.fmri[i])[0, 1] for i in range(a.fmri.shape[0])]
        assert min(r) > 0.9999
    np.testing.assert_array_equal(back.truth.coupling, cohort.truth.coupling)
    assert sorted(back.truth.perturb_bold) == sorted(cohort.truth.perturb_bold)
    # The store alone (no raw data) gives the same cohort, truth included.
    cfg.data.source = "store"
    offline = load_prepared_cohort(cfg)
    assert len(offline.recordings) == 3 and offline.truth is not None
