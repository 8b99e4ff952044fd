"""Simulated cohort: determinism, layout, physiology (haemodynamic lag, FC-SC, perturbations), truth I/O."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from twinbrain.config import ConfigError, SimConfig, load_config
from twinbrain.data.simulate import cohort as sim_cohort
from twinbrain.data.simulate import dynamics, hemodynamics, load_truth, save_truth, simulate_cohort

# Small and fast: 100 Hz EEG, 1 s TR, 5 ms steps.
SMALL = SimConfig(n_subjects=2, n_sessions=2, minutes=1.0, n_regions=12, n_modules=3, n_channels=8,
                  tr=1.0, eeg_sfreq=100.0, dt_ms=5.0, n_perturb=3, seed=7)
# Long enough for stable correlation estimates.
LONG = dataclasses.replace(SMALL, n_subjects=3, n_sessions=1, minutes=5.0, n_regions=18)


@pytest.fixture(scope="module")
def small():
    return simulate_cohort(SMALL)


@pytest.fixture(scope="module")
def long():
    return simulate_cohort(LONG)


def _arrays(cohort):
    """Every array of a cohort, in a fixed order."""
    out = []
    for r in cohort.recordings:
        out += [r.eeg, r.fmri, r.channel_pos, r.region_pos]
    t = cohort.truth
    out += [t.coupling, t.gain, t.perturb_regions]
    for sid in cohort.subjects:
        out += [t.subject_coupling[sid], t.perturb_bold[sid], t.perturb_eeg[sid]]
    return out


def test_same_seed_is_bit_identical(small):
    again = simulate_cohort(SMALL)
    a, b = _arrays(small), _arrays(again)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_other_seed_differs(small):
    other = simulate_cohort(dataclasses.replace(SMALL, seed=8))
    assert not np.array_equal(small.recordings[0].eeg, other.recordings[0].eeg)
    assert not np.array_equal(small.recordings[0].fmri, other.recordings[0].fmri)
    assert not np.array_equal(small.truth.coupling, other.truth.coupling)


def test_sessions_differ_but_share_subject(small):
    r11, r12 = small.recordings[0], small.recordings[1]
    assert (r11.subject, r11.session, r12.session) == ("01", "01", "02")
    assert not np.array_equal(r11.fmri, r12.fmri)
    assert r11.meta["coupling_scale"] == r12.meta["coupling_scale"]


def test_a_subject_does_not_depend_on_cohort_size(small):
    bigger = simulate_cohort(dataclasses.replace(SMALL, n_subjects=3))
    assert np.array_equal(bigger.recordings[0].eeg, small.recordings[0].eeg)
    assert np.array_equal(bigger.truth.perturb_bold["01"], small.truth.perturb_bold["01"])


def test_shapes_rates_dtypes(small):
    cfg = SMALL
    n_vol = int(cfg.minutes * 60 / cfg.tr)
    spt = int(cfg.tr * cfg.eeg_sfreq)
    assert [(r.subject, r.session) for r in small.recordings] == [
        ("01", "01"), ("01", "02"), ("02", "01"), ("02", "02")]
    for r in small.recordings:
        r.check()
        assert (r.task, r.run, r.eeg_onset_s) == ("rest", "1", 0.0)
        assert r.eeg.dtype == np.float32 and r.fmri.dtype == np.float32
        assert r.eeg.shape == (cfg.n_channels, n_vol * spt)
        assert r.fmri.shape == (cfg.n_regions, n_vol)
        assert r.eeg_sfreq == cfg.eeg_sfreq and r.tr == cfg.tr
        # EEG covers exactly the fMRI wall-clock span.
        assert r.eeg.shape[1] / r.eeg_sfreq == pytest.approx(r.fmri.shape[1] * r.tr)
        assert r.duration_s == pytest.approx(cfg.minutes * 60)
        assert r.region_mask.dtype == bool and r.region_mask.all()
        assert len(set(r.channel_names)) == cfg.n_channels and len(set(r.region_names)) == cfg.n_regions
        assert r.modules.shape == (cfg.n_regions,) and set(r.modules) == set(range(cfg.n_modules))
        assert all(name.startswith(f"M{m}_R") for name, m in zip(r.region_names, r.modules))
        # Regions inside a head-sized sphere, electrodes on the scalp (metres).
        centre = r.channel_pos.mean(axis=0)
        assert np.linalg.norm(r.region_pos - centre, axis=1).max() < 100         # mm
        assert 70 < np.linalg.norm(r.channel_pos, axis=1).mean() < 130
        assert 1e-6 < r.eeg.std() < 1e-4                         # volts, tens of microvolts
    t = small.truth
    r_n, c_n, p_n = cfg.n_regions, cfg.n_channels, cfg.n_perturb
    assert t.coupling.shape == (r_n, r_n) and np.all(np.diag(t.coupling) == 0) and (t.coupling >= 0).all()
    assert t.gain.shape == (c_n, r_n) and np.isfinite(t.gain).all()
    assert t.perturb_regions.shape == (p_n,) and len(set(t.perturb_regions)) == p_n
    assert len(set(t.modules[t.perturb_regions])) == min(p_n, cfg.n_modules)   # spread over modules
    assert np.array_equal(t.modules, small.recordings[0].modules)
    t_resp = t.perturb_bold["01"].shape[-1]
    assert t_resp * cfg.tr >= 30
    for sid in ("01", "02"):
        assert t.subject_coupling[sid].shape == (r_n, r_n)
        assert np.array_equal(t.subject_coupling[sid] > 0, t.coupling > 0)       # same topology
        assert not np.array_equal(t.subject_coupling[sid], t.coupling)
        assert t.perturb_bold[sid].shape == (p_n, r_n, t_resp)
        assert t.perturb_eeg[sid].shape == (p_n, c_n, t_resp * spt)
        assert t.perturb_bold[sid].dtype == np.float32 and t.perturb_eeg[sid].dtype == np.float32
    assert t.perturb_onset_s > 0 and t.perturb_onset_s % cfg.tr == 0


def test_directed_modular_coupling(long):
    w, mods = long.truth.coupling, long.truth.modules
    same = mods[:, None] == mods[None]
    off = ~np.eye(len(mods), dtype=bool)
    assert (w > 0)[same & off].mean() > 0.4 > 0.1 > (w > 0)[~same].mean()
    assert not np.allclose(w, w.T)                                 # directed


def test_bold_lags_neural_drive_by_haemodynamic_delay():
    cfg = dataclasses.replace(LONG, tr=0.5, n_subjects=2, n_regions=12)
    anatomy = sim_cohort.build_anatomy(cfg)
    params = sim_cohort.neural_params(cfg, [sim_cohort.build_subject(cfg, anatomy, i) for i in range(2)])
    timing = dynamics.Timing.build(cfg.eeg_sfreq, cfg.tr, cfg.dt_ms)
    rngs = [np.random.default_rng(i) for i in range(2)]
    state = dynamics.NetworkState.initial(params, rngs)
    dynamics.integrate(params, state, rngs, timing, 80)                       # burn-in
    seg = dynamics.integrate(params, state, rngs, timing, 360, record_drive=True)
    drive, bold = seg.drive[:, 0], seg.bold[:, 0]                            # [G, R, blocks], [G, R, T]
    drive = drive.reshape(*bold.shape, -1).mean(axis=-1)                     # mean per TR
    z = lambda x: (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)  # noqa: E731
    d, b = z(drive), z(bold)
    n = d.shape[-1]
    lags = np.arange(0, 25)                                                  # 0 .. 12 s
    xcorr = np.array([(d[..., : n - k] * b[..., k:]).mean() for k in lags])
    assert 4.0 <= lags[np.argmax(xcorr)] * cfg.tr <= 6.0
    assert xcorr.max() > 0.5


def test_haemodynamic_response_peaks_at_about_five_seconds():
    h = hemodynamics.impulse_response(duration_s=32.0, dt=0.01)
    assert 4.0 <= np.argmax(h) * 0.01 <= 6.0
    assert h.min() < 0 and np.argmin(h) * 0.01 > 8.0                       # post-stimulus undershoot


def test_fc_follows_structural_coupling(long):
    w, mods = long.truth.coupling, long.truth.modules
    sc = (w + w.T) / 2
    iu = np.triu_indices(len(mods), 1)
    fc = np.mean([np.corrcoef(r.fmri) for r in long.recordings], axis=0)
    assert np.corrcoef(fc[iu], sc[iu])[0, 1] > 0.4
    same = (mods[:, None] == mods[None])[iu]
    assert fc[iu][same].mean() > fc[iu][~same].mean() + 0.1


def test_perturbation_response_follows_coupling(long):
    t = long.truth
    for sid in long.subjects:
        w = t.subject_coupling[sid]
        for p, k in enumerate(t.perturb_regions):
            peak = np.abs(t.perturb_bold[sid][p]).max(axis=1)               # [R]
            col = w[:, k].copy()
            col[k] = np.nan
            strong = np.argsort(-np.nan_to_num(col, nan=-1.0))[:3]
            weak = np.flatnonzero(col == 0)
            assert len(weak) and peak[k] > 0.5 * peak.max()
            assert peak[strong].mean() > 3 * peak[weak].mean()
            assert np.abs(t.perturb_eeg[sid][p]).max() > 0


def test_eeg_has_alpha_peak(small):
    from scipy.signal import welch

    r = small.recordings[0]
    f, pxx = welch(r.eeg, fs=r.eeg_sfreq, nperseg=int(4 * r.eeg_sfreq))
    spectrum = pxx.mean(axis=0)
    assert 7.0 <= f[np.argmax(spectrum)] <= 13.0
    assert spectrum.max() > 5 * spectrum[np.searchsorted(f, 30.0)]


def test_truth_roundtrip(small, tmp_path):
    npz, js = save_truth(small.truth, tmp_path / "truth" / "ground_truth.npz")
    assert npz.is_file() and js.is_file()
    back = load_truth(tmp_path / "truth" / "ground_truth")
    t = small.truth
    for name in ("coupling", "perturb_regions", "modules", "gain"):
        a, b = getattr(t, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b)
    for name in ("subject_coupling", "perturb_bold", "perturb_eeg"):
        a, b = getattr(t, name), getattr(back, name)
        assert list(a) == list(b)
        for sid in a:
            assert a[sid].dtype == b[sid].dtype and np.array_equal(a[sid], b[sid])
    assert back.perturb_onset_s == t.perturb_onset_s
    assert back.meta == t.meta


def test_many_regions_and_no_perturbation():
    cfg = SimConfig(n_subjects=1, minutes=0.5, n_regions=200, n_modules=8, n_channels=64, tr=1.0,
                    eeg_sfreq=100.0, dt_ms=5.0, n_perturb=0)
    cohort = simulate_cohort(cfg)
    rec = cohort.recordings[0]
    rec.check()
    assert rec.fmri.shape == (200, 30) and rec.eeg.shape == (64, 3000)
    assert cohort.truth.perturb_bold["01"].shape[:2] == (0, 200)


def test_config_validation_stays_in_config():
    with pytest.raises(ConfigError, match="sim.n_perturb"):
        load_config(overrides={"sim": {"n_perturb": 13, "n_regions": 12}, "graph": {"k_fmri": 4}})
    with pytest.raises(ConfigError, match="sim.eeg_sfreq"):
        load_config(overrides={"sim": {"tr": 0.75}, "data": {"window_s": 75.0}})   # 187.5 samples per TR
