"""Connectivity and graph construction: k-NN/threshold, lagged cross edges, coherence, fit-span only."""

import numpy as np
import pytest
from tests.synth_recordings import make_recording

from twinbrain.config import GraphConfig
from twinbrain.data.graph import (EEG_FC, EEG_TO_FMRI, FMRI_FC, RELATIONS, abs_corr, band_coherence,
                                  build_group_graph, build_run_graph, knn_edges, lag_volumes, lagged_cross_corr)


def _edge_set(ei):
    return {(int(a), int(b)) for a, b in ei.T}


def test_knn_threshold_on_known_matrix():
    sim = np.array([[0, .9, .2, .05],
                    [.9, 0, .6, .1],
                    [.2, .6, 0, .3],
                    [.05, .1, .3, 0]])
    ei, w = knn_edges(sim, k=1, threshold=0.25, symmetric=False)
    # each destination receives from its single most similar node, if above 0.25
    assert _edge_set(ei) == {(1, 0), (0, 1), (1, 2), (2, 3)}
    assert np.allclose(w, [sim[a, b] for a, b in ei.T])
    ei, w = knn_edges(sim, k=1, threshold=0.25)  # symmetric union
    assert _edge_set(ei) == {(1, 0), (0, 1), (1, 2), (2, 1), (2, 3), (3, 2)}
    ei, w = knn_edges(sim, k=3, threshold=0.95)
    assert ei.shape == (2, 0) and w.shape == (0,) and ei.dtype == np.int64 and w.dtype == np.float32


def test_fmri_clusters_give_within_cluster_edges():
    rng = np.random.default_rng(0)
    t = 400
    latents = rng.standard_normal((2, t))
    fmri = np.repeat(latents, 3, axis=0) + 0.3 * rng.standard_normal((6, t))   # regions 0-2 and 3-5
    rec = make_recording(fmri=fmri, tr=1.0, sfreq=10.0)
    g = build_run_graph(rec, (0, t), GraphConfig(k_fmri=2, k_eeg=1, k_cross=1, threshold=0.5))
    ei, w = g.edge_index[FMRI_FC], g.edge_weight[FMRI_FC]
    cluster = np.arange(6) // 3
    assert ei.shape[1] == 12                          # every node linked to the 2 others of its cluster
    assert (cluster[ei[0]] == cluster[ei[1]]).all() and (ei[0] != ei[1]).all()
    assert (w > 0.5).all() and (w <= 1).all()
    assert set(g.num_edges()) == {"__".join(k) for k in RELATIONS}


def _lagged_recording(lag_vols: int, seed: int = 0, n_vols: int = 300, sfreq: float = 40.0):
    """EEG channel 0's power envelope drives BOLD of region 3 ``lag_vols`` volumes later (TR 1 s)."""
    rng = np.random.default_rng(seed)
    env = np.convolve(rng.standard_normal(n_vols + 20), np.ones(3) / 3, "same")[:n_vols]
    env = np.exp(env)                                               # positive power envelope per volume
    spt = int(sfreq)
    eeg = rng.standard_normal((4, n_vols * spt))
    eeg[0] *= np.repeat(np.sqrt(env), spt)
    fmri = rng.standard_normal((6, n_vols))
    fmri[3, lag_vols:] = env[:n_vols - lag_vols] + 0.1 * rng.standard_normal(n_vols - lag_vols)
    return make_recording(fmri=fmri, eeg=eeg, tr=1.0, sfreq=sfreq)


def test_lagged_cross_edges_find_5s_lag():
    rec = _lagged_recording(5)
    g = build_run_graph(rec, (0, 300), GraphConfig(k_fmri=1, k_eeg=1, k_cross=1, threshold=0.3,
                                                   cross_lag_min_s=4.0, cross_lag_max_s=6.0))
    ei = g.edge_index[EEG_TO_FMRI]
    assert (0, 3) in _edge_set(ei)                 # src = EEG channel 0, dst = region 3
    assert not any(a != 0 for a, _ in _edge_set(ei))  # the other channels are unrelated noise
    power = (rec.eeg.astype(np.float64) ** 2).reshape(4, 300, 40).mean(axis=2)
    r, lag = lagged_cross_corr(power, rec.fmri.astype(np.float64), np.arange(0, 11))
    assert lag[0, 3] == 5 and r[0, 3] > 0.8
    r_short, _ = lagged_cross_corr(power, rec.fmri.astype(np.float64), lag_volumes(1.0, 0.0, 2.0))
    assert r_short[0, 3] < 0.3                      # outside the haemodynamic range the link is weak


def test_lag_volumes():
    assert lag_volumes(2.0, 4.0, 6.0).tolist() == [2, 3]
    assert lag_volumes(0.72, 4.0, 6.0).tolist() == [6, 7, 8]
    assert lag_volumes(3.0, 4.0, 5.0).tolist() == [2]        # no whole TR in range: nearest to the centre


def test_connectivity_uses_only_the_fit_span():
    rec = _lagged_recording(5, seed=1)
    cfg = GraphConfig(k_fmri=3, k_eeg=2, k_cross=2, threshold=0.05)
    g1 = build_run_graph(rec, (0.0, 150.0), cfg)
    rng = np.random.default_rng(9)
    rec.fmri[:, 150:] = rng.standard_normal(rec.fmri[:, 150:].shape)      # change everything after the span
    rec.eeg[:, 150 * 40:] = rng.standard_normal(rec.eeg[:, 150 * 40:].shape)
    g2 = build_run_graph(rec, (0.0, 150.0), cfg)
    g3 = build_group_graph([rec, rec], [(0.0, 150.0), (0.0, 150.0)], cfg)
    for key in RELATIONS:
        np.testing.assert_array_equal(g1.edge_index[key], g2.edge_index[key])
        np.testing.assert_array_equal(g1.edge_weight[key], g2.edge_weight[key])
        np.testing.assert_array_equal(g1.edge_index[key], g3.edge_index[key])
    rec.fmri[:, 100:150] = rng.standard_normal(rec.fmri[:, 100:150].shape)   # inside the span: it changes
    g4 = build_run_graph(rec, (0.0, 150.0), cfg)
    assert not np.array_equal(g1.edge_weight[FMRI_FC], g4.edge_weight[FMRI_FC])


def test_coherence_links_channels_sharing_an_oscillation():
    rng = np.random.default_rng(2)
    sfreq, n = 100.0, 6000
    t = np.arange(n) / sfreq
    common = np.sin(2 * np.pi * 10 * t + 0.3 * np.cumsum(rng.standard_normal(n)) / np.sqrt(sfreq))
    eeg = rng.standard_normal((4, n))
    eeg[0] += 3 * common
    eeg[2] += 3 * np.roll(common, 7)                 # phase-shifted copy: coherent, not zero-lag correlated
    coh = band_coherence(eeg, sfreq, (9.5, 10.5))
    assert coh[0, 2] > 0.6 and coh[0, 1] < 0.2 and coh[1, 3] < 0.2 and np.allclose(coh, coh.T)
    rec = make_recording(fmri=rng.standard_normal((5, 60)), eeg=eeg, tr=1.0, sfreq=sfreq)
    g = build_run_graph(rec, (0, 60), GraphConfig(k_fmri=1, k_eeg=1, k_cross=1, threshold=0.3,
                                                  eeg_measure="coherence"), eeg_band=(9.5, 10.5))
    assert _edge_set(g.edge_index[EEG_FC]) == {(0, 2), (2, 0)}


def test_group_graph_ignores_missing_slots():
    recs = [make_recording(seed=s) for s in range(3)]
    recs[0].region_mask[2] = False
    recs[0].fmri[2] = 0.0
    g = build_group_graph(recs, [(0, 120)] * 3, GraphConfig(k_fmri=2, k_eeg=1, k_cross=1, threshold=0.0))
    assert g.n_fmri == 6 and g.n_eeg == 4
    ei, ew = g.torch(FMRI_FC)
    assert ei.dtype.is_floating_point is False and ei.shape[0] == 2 and ew.dtype.is_floating_point
    with pytest.raises(ValueError, match="fixed"):
        build_group_graph([recs[0], make_recording(n_regions=5)], [(0, 120)] * 2, GraphConfig())


def test_large_graph_has_k_neighbours_and_no_self_loops():
    # Its speed is measured in bench/graph_build.py, not here.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 1200)).astype(np.float32)
    ei, w = knn_edges(abs_corr(x), k=10, threshold=0.0)
    assert ei.shape[1] >= 10 * 1000 and (ei[0] != ei[1]).all()


def test_coherence_matches_scipy():
    from scipy.signal import coherence
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5000))
    x[1] += x[0]
    f, c = coherence(x[0], x[1], fs=100.0, nperseg=100)
    sel = (f >= 1) & (f <= 40)
    assert abs(band_coherence(x, 100.0, (1.0, 40.0))[0, 1] - c[sel].mean()) < 1e-3
