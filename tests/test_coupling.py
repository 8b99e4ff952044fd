"""Directed coupling, the linear core and EC on generated ground truth (row = target, column = source).

The linear ground truth is a VAR(1) with a known sparse signed matrix (twinbrain.data.simulate.systems);
the twin must recover it after its closed-form start, an untrained twin must not, and the three EC
methods must agree where they should.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.batches import make_window, tiny_model_config
from twinbrain.config import load_config
from twinbrain.data.module import DataModule
from twinbrain.data.series import mean_abs_correlation, span_series
from twinbrain.data.simulate.systems import offdiag_pearson, series_cohort, simulate_var, sparse_signed_matrix
from twinbrain.model import build_model
from twinbrain.train.warm_start import warm_start
from twinbrain.twin.twin import Twin

pytestmark = pytest.mark.usefixtures("one_thread")


def gt_config(n: int, forecast_steps: int = 3, **over):
    args = ["--sim.tr", "1.0", "--sim.eeg_sfreq", "1", "--model.eeg_patch", "1", "--model.eeg_stride", "1",
            "--data.window_s", "24", "--data.stride_s", "12", "--data.calib_s", "0", "--data.augment_noise", "0",
            "--sim.n_regions", str(n), "--sim.n_channels", "8", "--graph.k_fmri", "4",
            "--logging.wandb", "disabled", "--model.hidden", "16", "--model.heads", "2",
            "--model.forecast_steps", str(forecast_steps), "--eval.horizons", "[1]",
            "--data.val_subjects", "1", "--data.test_subjects", "1"]
    for k, v in over.items():
        args += [f"--{k}", str(v)]
    return load_config("configs/smoke.yaml", args)


@pytest.fixture(scope="module")
def var_system():
    truth = sparse_signed_matrix(20, density=0.2, spectral_radius=0.8, seed=3)
    series = [simulate_var(truth, 3000, seed=10 + i) for i in range(5)]
    cfg = gt_config(20)
    dm = DataModule(cfg, cohort=series_cohort(series)).setup()
    return truth, cfg, dm


def twin_for(cfg, dm, warm: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg, n_subjects=len(dm.subject_map), n_sessions=len(dm.session_map),
                        n_fmri_slots=dm.n_fmri_slots, n_eeg_slots=dm.n_eeg_slots, samples_per_tr=dm.samples_per_tr)
    report = warm_start(model, dm, cfg) if warm else None
    return Twin(model, cfg, dm.metadata(), data=dm), report


def design(series: list[np.ndarray], p: int):
    """Independent lag design: Z ``[M, p·N]`` (lag-major: column k·N + j = x_j(t-1-k)) and Y ``[M, N]``."""
    zs, ys = [], []
    for s in series:
        t = np.arange(p, s.shape[1])
        zs.append(np.concatenate([s[:, t - 1 - k].T for k in range(p)], axis=1))
        ys.append(s[:, t].T)
    return np.concatenate(zs), np.concatenate(ys)


def brute_fit(train, p: int, a_own: float, a_cross: float):
    """Per-target ridge with its own lags penalised by ``a_own`` and the others by ``a_cross``."""
    z, y = design(train, p)
    zm, ym = z.mean(0), y.mean(0)
    zc, yc = z - zm, y - ym
    n = y.shape[1]
    w = np.zeros((p * n, n))
    for i in range(n):
        d = np.full(p * n, a_cross)
        d[np.arange(p) * n + i] = a_own
        w[:, i] = np.linalg.solve(zc.T @ zc + np.diag(d), zc.T @ yc[:, i])
    return w, ym - w.T @ zm


def val_mse(w, b, val, p: int, p_max: int) -> float:
    z, y = design([v[:, p_max - p:] for v in val], p)
    return float(((z @ w + b - y) ** 2).mean())


def test_warm_started_twin_forecasts_exactly_like_the_tuned_linear_model(var_system):
    truth, cfg, dm = var_system
    twin, report = twin_for(cfg, dm, warm=True)
    info = report["fmri"]
    assert info["chosen_on"] == "val"
    train = span_series(dm.cohort, dm.stats, dm.split.train, "fmri")
    val = span_series(dm.cohort, dm.stats, dm.split.val, "fmri")
    # The chosen (order, own / cross penalties) is the best of the grid on validation, checked by an
    # independent per-target ridge, and it is what the core holds.
    p_max, alphas = cfg.model.linear_order, sorted(cfg.eval.baseline_alphas)
    grid = []
    for p in range(1, p_max + 1):
        for c in alphas:
            for a in [x for x in alphas if x <= c]:
                w, b = brute_fit(train, p, a, c)
                grid.append((val_mse(w, b, val, p, p_max), p, a, c, w, b))
    best = min(grid, key=lambda g: g[0])
    assert best[1:4] == (info["order"], info["alpha"], info["alpha_cross"])
    p, w, b = info["order"], best[4], best[5]
    windows = twin.windows(split="test")[:6]
    got = twin.forecast(windows, 3)["fmri"]                                    # [B, N, 3]
    want = []
    for win in windows:                                                        # iterate the brute-force fit
        hist = list(win["fmri"].x[..., 0].numpy().T[::-1][:p])                 # newest first
        out = []
        for _ in range(3):
            nxt = np.concatenate(hist[:p]) @ w + b
            out.append(nxt)
            hist.insert(0, nxt)
        want.append(np.stack(out, 1))
    np.testing.assert_allclose(got, np.stack(want), atol=2e-4)


def test_ec_recovers_linear_ground_truth_and_requires_learning(var_system):
    truth, cfg, dm = var_system
    twin, _ = twin_for(cfg, dm, warm=True)
    windows = twin.windows(split="test")[::20]
    ec_jac = twin.effective_connectivity(windows, method="jacobian")
    ec_pert = twin.effective_connectivity(windows, amplitude=0.5)
    r = offdiag_pearson(ec_jac, truth)
    assert r >= 0.95, r
    np.testing.assert_allclose(ec_jac, ec_pert, atol=1e-5)                     # linear at step 0: identical
    np.testing.assert_allclose(twin.effective_connectivity(method="linear"), ec_jac, atol=1e-5)
    fc = mean_abs_correlation(span_series(dm.cohort, dm.stats, dm.split.train, "fmri"))
    assert offdiag_pearson(fc, truth) < r - 0.3                                # the input graph is no answer
    untrained, _ = twin_for(cfg, dm, warm=False)            # persistence core: no off-diagonal EC at all
    ec_untrained = untrained.effective_connectivity(windows, method="jacobian")
    off = ~np.eye(20, dtype=bool)
    assert np.abs(ec_untrained[off]).max() < 1e-6 or abs(offdiag_pearson(ec_untrained, truth)) < 0.3


def test_jacobian_ec_equals_perturbation_ec_at_small_amplitude(var_system):
    _, cfg, dm = var_system
    twin, _ = twin_for(cfg, dm, warm=True, seed=1)
    with torch.no_grad():                                   # open the nonlinear path: EC is no longer linear
        twin.model.gate["fmri"].weight.fill_(1.0)
    windows = twin.windows(split="val")[:3]
    jac = twin.effective_connectivity(windows, method="jacobian", horizon=2)
    small = twin.effective_connectivity(windows, amplitude=1e-3, horizon=2)
    large = twin.effective_connectivity(windows, amplitude=3.0, horizon=2)
    np.testing.assert_allclose(small, jac, atol=2e-4)
    assert np.nanmax(np.abs(large - jac)) > 10 * np.nanmax(np.abs(small - jac))   # nonlinear indeed


def test_fmri_stimulation_reaches_eeg_forecasts_through_the_coupling():
    spt, t_f = 4, 8
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = build_model(cfg, n_subjects=1, n_sessions=1, n_fmri_slots=6, n_eeg_slots=4, samples_per_tr=spt).eval()
    w = make_window(6, 4, t_f, spt, seed=1)
    stim = w.clone()
    stim["fmri"].x = w["fmri"].x.clone()
    stim["fmri"].x[2, -1] += 1.0                            # fMRI region 2, last TR of the context

    def eeg_forecast(window):
        with torch.no_grad():
            return model(window).forecast["eeg"][:, -1]     # read after the last EEG step of the window

    assert (eeg_forecast(stim) - eeg_forecast(w)).abs().max() > 1e-4
    with torch.no_grad():
        model.coupling["fmri__to__eeg"].weight.zero_()
    torch.testing.assert_close(eeg_forecast(stim), eeg_forecast(w))
