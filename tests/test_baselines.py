"""Baselines: persistence closed form on AR(1), coefficient recovery for AR(p) and VAR(p), API contracts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import lfilter

from twinbrain.scoring.baselines import (ARBaseline, MLPBaseline, Persistence, VARBaseline, build_baselines,
                                      persistence, tuned_baselines)
from twinbrain.scoring.linear import DEFAULT_ALPHAS, RidgeVAR, fit_ridge_var, select_ridge_var
from twinbrain.eval.forecast_eval import strongest_baseline
from twinbrain.scoring.metrics import R2Accumulator, skill


def _ar_series(coefs, n, t, seed, burn=500):
    """``n`` independent AR(p) series ``[n, t]`` with lag coefficients ``coefs`` (per node or shared)."""
    rng = np.random.default_rng(seed)
    coefs = np.atleast_2d(np.asarray(coefs, dtype=float))           # [1 or n, p]
    coefs = np.broadcast_to(coefs, (n, coefs.shape[-1]))
    e = rng.normal(size=(n, t + burn))
    return np.stack([lfilter([1.0], np.r_[1.0, -c], e[i]) for i, c in enumerate(coefs)])[:, burn:]


def _var_series(a, t, seed, burn=200, noise=1.0):
    rng = np.random.default_rng(seed)
    x = np.zeros((a.shape[0], t + burn))
    e = noise * rng.normal(size=x.shape)
    for k in range(1, t + burn):
        x[:, k] = a @ x[:, k - 1] + e[:, k]
    return x[:, burn:]


def _windows(series, t_ctx, h, stride=1):
    """Cut ``[N, T]`` series into ctx ``[W, N, t_ctx]`` and targets ``[W, N, h]``."""
    v = sliding_window_view(series, t_ctx + h, axis=1)[:, ::stride]     # [N, W, t_ctx + h]
    v = v.transpose(1, 0, 2)
    return v[..., :t_ctx], v[..., t_ctx:]


def _r2(pred, target):
    acc = R2Accumulator(horizons=target.shape[-1])
    acc.update(torch.as_tensor(np.array(pred)), torch.as_tensor(np.array(target)))
    return acc.compute().numpy()


def test_persistence_matches_ar1_closed_form():
    # Stationary AR(1), coefficient φ: E(x_{t+h} − x_t)² = 2σ²(1 − φ^h), so R² = 1 − 2(1 − φ^h) = 2φ^h − 1.
    phi, h = 0.9, 4
    x = _ar_series([phi], n=40, t=5000, seed=0)
    ctx, tgt = _windows(x, t_ctx=3, h=h)
    r2 = _r2(persistence(ctx, h), tgt)
    expected = 2 * phi ** np.arange(1, h + 1) - 1                       # 0.8, 0.62, 0.458, 0.312
    assert np.allclose(r2, expected, atol=0.02)
    # Fitted AR(1) is the optimal predictor φ^h x_t: R² = φ^(2h), above persistence at every horizon.
    ar1 = ARBaseline(1, alpha=0.0).fit([x[:, :2500]])
    assert np.allclose(ar1.coef, phi, atol=0.03)
    r2_ar = _r2(ar1.predict(ctx, h), tgt)
    assert np.allclose(r2_ar, phi ** (2 * np.arange(1, h + 1)), atol=0.02)
    assert (skill(r2_ar, r2) > 0).all()


def test_persistence_values_and_types():
    ctx = np.arange(24, dtype=float).reshape(2, 3, 4)
    out = persistence(ctx, 2)
    assert out.shape == (2, 3, 2) and (out == ctx[..., -1:]).all()
    t = Persistence().predict(torch.as_tensor(ctx, dtype=torch.float32), 3)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (2, 3, 3)


def test_ar_recovers_known_coefficients_per_node():
    coefs = np.array([[0.5, 0.3], [1.2, -0.5], [-0.2, 0.4]])             # all stationary
    x = _ar_series(coefs, n=3, t=20000, seed=1) + np.array([[1.0], [0.0], [-2.0]])
    ar = ARBaseline(p=2, alpha=1.0).fit([x[:, :10000], x[:, 10000:]])
    assert np.allclose(ar.coef, coefs, atol=0.03)
    assert np.allclose(ar.intercept / (1 - coefs.sum(1)), [1.0, 0.0, -2.0], atol=0.15)   # process mean


def test_ar_skips_missing_values_and_iterates():
    x = _ar_series([0.7], n=2, t=3000, seed=2)
    x_nan = x.copy()
    x_nan[1, 100:200] = np.nan                               # a gap in node 1 only
    ar = ARBaseline(1, alpha=0.0).fit([x_nan])
    assert np.isfinite(ar.coef).all() and np.allclose(ar.coef[:, 0], 0.7, atol=0.05)
    ctx = np.ones((1, 2, 1))
    out = ar.predict(ctx, 3)
    c, a = ar.intercept, ar.coef[:, 0]
    step1 = c + a
    assert np.allclose(out[0, :, 0], step1) and np.allclose(out[0, :, 1], c + a * step1)


def test_var_recovers_sparse_matrix_and_solvers_agree():
    n = 10
    rng = np.random.default_rng(3)
    a = np.diag(np.full(n, 0.4))
    for i, j in rng.choice(n, size=(12, 2)):
        if i != j:
            a[i, j] = rng.choice([-0.3, 0.3])
    a *= 0.8 / max(1.0, np.abs(np.linalg.eigvals(a)).max())             # stable
    series = [_var_series(a, 4000, seed=s) for s in range(3)]
    var = VARBaseline(p=1, alpha=1.0).fit(series)
    assert np.abs(var.coef[0] - a).max() < 0.05
    # Primal (D x D) and dual (M x M) solve the same ridge problem.
    short = [s[:, :40] for s in series[:2]]                              # M = 78 < D = 2·10 → dual wins
    primal = VARBaseline(p=2, alpha=5.0, solver="primal").fit(short)
    dual = VARBaseline(p=2, alpha=5.0, solver="dual").fit(short)
    assert np.allclose(primal.coef, dual.coef, atol=1e-8) and np.allclose(primal.intercept, dual.intercept)


def test_var_p2_prediction_iterates_the_recursion():
    rng = np.random.default_rng(4)
    var = VARBaseline(p=2, alpha=1.0).fit([rng.normal(size=(3, 200))])
    ctx = rng.normal(size=(2, 3, 5))
    out = var.predict(torch.as_tensor(ctx), 3)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    hist = [ctx[..., -2], ctx[..., -1]]
    for h in range(3):
        nxt = var.intercept + hist[-1] @ var.coef[0].T + hist[-2] @ var.coef[1].T
        assert np.allclose(out[..., h].numpy(), nxt)
        hist.append(nxt)


def test_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="fit"):
        ARBaseline(2).predict(np.zeros((1, 2, 5)), 1)
    ar = ARBaseline(3).fit([np.random.default_rng(0).normal(size=(2, 50))])
    with pytest.raises(ValueError, match="at least 3 context steps"):
        ar.predict(np.zeros((1, 2, 2)), 1)
    with pytest.raises(ValueError, match=r"\[W, N, T_ctx\]"):
        ar.predict(np.zeros((2, 5)), 1)
    with pytest.raises(ValueError, match="non-finite"):
        VARBaseline(1).fit([np.full((2, 10), np.nan)])
    with pytest.raises(ValueError, match=r"\[N=2, T\]"):
        VARBaseline(1).fit([np.zeros((2, 10)), np.zeros((3, 10))])


def test_mlp_baseline_learns_ar1():
    # AR(1) with a = 0.5: the best one-step R² is 1 - 0.75 = 0.25 and persistence scores 2a - 1 = 0, so
    # an MLP that learned nothing useful cannot pass (with a = 0.9 persistence alone reaches 0.8).
    x = _ar_series([0.5], n=4, t=3000, seed=5)
    mlp = MLPBaseline(p=2, hidden=32, steps=150, lr=3e-3).fit([x[:, :2000]])
    ctx, tgt = _windows(x[:, 2000:], t_ctx=4, h=2, stride=3)
    r2 = _r2(mlp.predict(ctx, 2), tgt)
    r2_pers = _r2(Persistence().predict(ctx, 2), tgt)
    assert r2.shape == (2,) and r2[0] > 0.2 and r2[0] > r2_pers[0] + 0.15, (r2, r2_pers)


def test_build_baselines_names():
    b = build_baselines(ar_order=3, ridge_alpha=0.5, mlp=True)
    assert list(b) == ["persistence", "ar1", "ar3", "var3", "mlp3"]
    assert list(build_baselines(ar_order=1)) == ["persistence", "ar1", "var1"]


def test_fit_ridge_var_is_the_baseline_and_uses_row_target_convention():
    n = 6
    a = np.zeros((n, n))
    a[np.arange(n), np.arange(n)] = 0.5
    a[2, 4] = 0.4                                                       # node 4 drives node 2, not back
    series = [_var_series(a, 3000, seed=s) for s in range(2)]
    fit = fit_ridge_var(series, order=1, alpha=1.0)
    assert isinstance(fit, RidgeVAR) and fit.coef.shape == (1, n, n) and fit.intercept.shape == (n,)
    assert fit.coef[0, 2, 4] > 0.3 and abs(fit.coef[0, 4, 2]) < 0.05
    assert np.allclose(fit.coef, VARBaseline(1, 1.0).fit(series).coef)
    lags = np.random.default_rng(0).normal(size=(3, n, 1))
    assert np.allclose(fit.step(lags), fit.intercept + lags[..., 0] @ fit.coef[0].T)


def test_select_ridge_var_picks_the_true_order_on_validation():
    # A VAR(2) whose second lag matters: validation must prefer p = 2 over p = 1 (and not need p = 3).
    n = 5
    rng = np.random.default_rng(1)
    a1, a2 = 0.3 * np.eye(n), -0.5 * np.eye(n)
    a1[0, 1] = 0.3
    x = np.zeros((n, 6200))
    e = rng.normal(size=x.shape)
    for t in range(2, x.shape[1]):
        x[:, t] = a1 @ x[:, t - 1] + a2 @ x[:, t - 2] + e[:, t]
    x = x[:, 200:]
    best, scores = select_ridge_var([x[:, :4000]], [x[:, 4000:]], orders=(1, 2, 3), alphas=(0.1, 10.0, 1e4))
    assert set(scores) == {(p, a) for p in (1, 2, 3) for a in (0.1, 10.0, 1e4)}
    assert best.order == 2 and scores[(2, best.alpha)] == min(scores.values())
    assert scores[(1, best.alpha)] > 1.2 * scores[(2, best.alpha)]
    # The winner is fitted on the training series only (never on validation).
    assert np.allclose(best.coef, fit_ridge_var([x[:, :4000]], 2, best.alpha).coef)


def test_select_ridge_var_regularises_when_training_data_are_few():
    # 40 independent noise nodes, 60 training steps: an unpenalised VAR over-fits; the tuned alpha is large
    # and its validation error is close to the noise floor (the mean), not above it.
    rng = np.random.default_rng(2)
    train, val = [rng.normal(size=(40, 60))], [rng.normal(size=(40, 2000))]
    best, scores = select_ridge_var(train, val, orders=(1, 3), alphas=(1e-3, 1.0, 1e3, 1e5))
    assert best.alpha >= 1e3 and scores[(best.order, best.alpha)] < 1.05
    assert scores[(3, 1e-3)] > 1.5
    with pytest.raises(ValueError, match="validation series 0 has non-finite"):
        select_ridge_var(train, [np.full((40, 50), np.nan)], orders=(1,), alphas=(1.0,))


def test_mlp_iterated_cannot_diverge_and_stops_early():
    # Few noisy training steps and a large learning rate: the one-step net over-fits; early stopping on
    # validation keeps a better step than the last, and a long roll-out stays inside the data's range.
    x = _ar_series([0.95], n=8, t=4000, seed=6)
    train, val = [x[:, :150]], [x[:, 2000:]]
    mlp = MLPBaseline(p=3, hidden=64, steps=400, lr=2e-2, eval_every=20).fit(train, val)
    assert 0 <= mlp.best_step <= 400 and np.isfinite(mlp.val_mse)
    ctx, _ = _windows(x[:, 2000:], t_ctx=3, h=1, stride=50)
    out = mlp.predict(ctx, 200)
    lo, hi = train[0].min(1), train[0].max(1)
    span = hi - lo
    assert np.isfinite(out).all()
    assert (out >= (lo - 0.1 * span - 1e-9)[None, :, None]).all() and (out <= (hi + 0.1 * span + 1e-9)[None, :, None]).all()
    # Without validation it trains all steps; with a zero-init head an untrained net is persistence.
    assert MLPBaseline(p=2, steps=5).fit(train).best_step == 5
    fresh = MLPBaseline(p=2, steps=1, lr=0.0).fit(train)
    inside, _ = _windows(train[0], t_ctx=3, h=1, stride=10)
    assert np.allclose(fresh.predict(inside, 1)[..., 0], inside[..., -1], atol=1e-6)


def test_tuned_baselines_choose_on_validation_and_fall_back_to_a_training_tail():
    n = 4
    a = 0.6 * np.eye(n)
    a[0, 1] = 0.3
    x = _var_series(a, 3000, seed=7)
    base, tuning = tuned_baselines([x[:, :2000]], [x[:, 2000:]], orders=(1, 2), alphas=(1.0, 1e4), mlp=True,
                                   mlp_steps=50)
    assert list(base) == ["persistence", "ar1", "ar", "var", "svar", "mlp"]
    assert tuning["var"]["order"] == 1 and tuning["var"]["alpha"] == 1.0          # the true model
    assert tuning["var"]["chosen_on"] == "validation split" and tuning["mlp"]["order"] == 1
    assert np.allclose(base["var"].coef[0], a, atol=0.1)
    assert tuning["svar"]["order"] == 1 and np.allclose(base["svar"].coef[0], a, atol=0.1)
    _, tail = tuned_baselines([x[:, :2000]], None, orders=(1, 2), alphas=(1.0, 1e4))
    assert tail["var"]["chosen_on"] == "last 20% of each training span"


def test_strongest_baseline_per_horizon():
    r2 = {"persistence": np.array([0.5, 0.1, np.nan]), "ar1": np.array([0.4, 0.3, 0.2]),
          "var": np.array([0.6, 0.2, 0.1])}
    assert strongest_baseline(r2) == ["var", "ar1", "ar1"]


def _centred_design(series, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Lag-major VAR(p) design ``[M, p·N]`` and targets ``[M, N]`` over every series, centred: the direct
    per-target ridge the closed forms are checked against."""
    zs, ys = [], []
    for s_ in series:
        t = np.arange(p, s_.shape[1])
        zs.append(np.concatenate([s_[:, t - 1 - k].T for k in range(p)], axis=1))
        ys.append(s_[:, t].T)
    z, y = np.concatenate(zs), np.concatenate(ys)
    return z - z.mean(0), y - y.mean(0)


def test_structured_ridge_matches_per_target_solves_and_nests_var_and_ar():
    """Own-lag penalty ``alpha`` and cross-node penalty ``alpha_cross`` (Woodbury from one inverse) equal
    a direct per-target ridge; equal penalties are the plain ridge VAR; a huge cross penalty is per-node AR."""
    from twinbrain.scoring.linear import fit_linear_model
    rng = np.random.default_rng(1)
    series = [rng.standard_normal((5, 300)).cumsum(1) * 0.1 for _ in range(2)]
    p, n = 2, 5
    fit = fit_linear_model(series, p, 0.5, 20.0)
    zc, yc = _centred_design(series, p)
    for i in range(n):
        d = np.full(p * n, 20.0)
        d[np.arange(p) * n + i] = 0.5
        w = np.linalg.solve(zc.T @ zc + np.diag(d), zc.T @ yc[:, i])
        np.testing.assert_allclose(fit.coef[:, i, :], w.reshape(p, n), atol=1e-8)
    plain = fit_ridge_var(series, p, 3.0)
    np.testing.assert_allclose(fit_linear_model(series, p, 3.0, 3.0).coef, plain.coef)
    ar_like = fit_linear_model(series, p, 0.5, 1e9).coef
    assert np.abs(ar_like[:, ~np.eye(n, dtype=bool)]).max() < 1e-5
    ar = ARBaseline(p, 0.5).fit(series)
    np.testing.assert_allclose(np.stack([np.diag(ar_like[k]) for k in range(p)], 1), ar.coef, atol=1e-4)


def test_prior_weighted_ridge_matches_per_target_solves():
    """The prior's sources of each target get ``alpha_cross^(1-w) · alpha_prior^w`` (w = prior over its
    maximum, the K strongest per target), its own lags ``alpha``, every other source ``alpha_cross``: the
    Woodbury fit equals a direct per-target ridge with that diagonal penalty."""
    from twinbrain.scoring.linear import fit_linear_model, prior_support
    rng = np.random.default_rng(2)
    p, n = 2, 6
    series = [rng.standard_normal((n, 250)).cumsum(1) * 0.1 for _ in range(2)]
    prior = np.abs(rng.standard_normal((n, n)))
    fit = fit_linear_model(series, p, 0.5, 50.0, alpha_prior=2.0, prior=prior)
    src, weight = prior_support(prior)
    assert src.shape == (n, n - 1) and not (src == np.arange(n)[:, None]).any()    # own node never a source
    w = prior.copy()
    np.fill_diagonal(w, 0)
    w /= w.max()
    np.testing.assert_allclose(np.take_along_axis(w, src, 1), weight)
    zc, yc = _centred_design(series, p)
    for i in range(n):
        pen = 50.0 ** (1 - w[i]) * 2.0 ** w[i]
        pen[i] = 0.5
        sol = np.linalg.solve(zc.T @ zc + np.diag(np.tile(pen, p)), zc.T @ yc[:, i])
        np.testing.assert_allclose(fit.coef[:, i, :], sol.reshape(p, n), atol=1e-8)
    assert fit.alpha_prior == 2.0
    with pytest.raises(ValueError, match="alpha_prior"):
        fit_linear_model(series, p, 0.5, 50.0, alpha_prior=100.0, prior=prior)


def test_prior_mean_shrinks_the_couplings_towards_the_prior_shape():
    """With ``prior_scale`` β each target's ridge penalty pulls its lag-1 couplings towards ``β · prior_mean``
    (|prior|² off the diagonal, a target's sources summing to 1 on average) instead of zero: the fit equals
    the direct per-target solve of ``min |y - Zw|² + Σ pen (w - m)²``, with the prior's penalty weights too."""
    from twinbrain.scoring.linear import fit_linear_model, prior_mean
    rng = np.random.default_rng(5)
    p, n, beta = 2, 6, 0.4
    series = [rng.standard_normal((n, 250)).cumsum(1) * 0.1 for _ in range(2)]
    prior = np.abs(rng.standard_normal((n, n)))
    mean = prior_mean(prior)
    np.testing.assert_allclose(np.diag(mean), 0.0)
    assert mean.sum(1).mean() == pytest.approx(1.0)
    np.testing.assert_allclose(mean / mean[0, 1], (prior ** 2 * (1 - np.eye(n))) / prior[0, 1] ** 2)
    zc, yc = _centred_design(series, p)
    w = prior * (1 - np.eye(n)) / (prior * (1 - np.eye(n))).max()
    for alpha_prior in (None, 2.0):
        fit = fit_linear_model(series, p, 0.5, 50.0, alpha_prior=alpha_prior, prior=prior, prior_scale=beta)
        assert fit.prior_scale == beta
        for i in range(n):
            pen = np.full(n, 50.0) if alpha_prior is None else 50.0 ** (1 - w[i]) * alpha_prior ** w[i]
            pen[i] = 0.5
            pen = np.tile(pen, p)
            m = np.zeros(p * n)
            m[:n] = beta * mean[i]
            sol = np.linalg.solve(zc.T @ zc + np.diag(pen), zc.T @ yc[:, i] + pen * m)
            np.testing.assert_allclose(fit.coef[:, i, :], sol.reshape(p, n), atol=1e-8)
    plain = fit_linear_model(series, p, 0.5, 50.0)
    np.testing.assert_allclose(fit_linear_model(series, p, 0.5, 50.0, prior=prior, prior_scale=0.0).coef, plain.coef)
    with pytest.raises(ValueError, match="prior_scale"):
        fit_linear_model(series, p, 0.5, 50.0, prior_scale=0.3)


def test_the_prior_scale_is_the_validation_optimum():
    """Selection fits β in closed form (the fit is affine in β): the chosen fit's validation MSE is what
    ``one_step_mse`` gives it, and neither a nearby β nor β = 0 with the same penalties does better."""
    from twinbrain.scoring.linear import fit_linear_model, select_linear_model
    from twinbrain.scoring.series import one_step_mse
    n = 12
    rng = np.random.default_rng(6)
    a = 0.25 * (rng.random((n, n)) < 0.3) * (1 - np.eye(n)) + np.diag(rng.uniform(0.3, 0.5, n))
    a *= 0.9 / np.max(np.abs(np.linalg.eigvals(a)))
    x = _var_series(a, 600, seed=7)
    train, val = [x[:, :300]], [x[:, 300:]]
    prior = a * (1 - np.eye(n)) + 0.05 * rng.random((n, n))     # marks the (positive) true sources
    fit, info = select_linear_model(train, val, orders=(1, 2), alphas=DEFAULT_ALPHAS, prior=prior)
    assert info["prior_scale"] > 0 and info["prior_scale"] == fit.prior_scale
    mse = lambda f: one_step_mse(f.step, val, f.order, 2)
    assert mse(fit) == pytest.approx(info["val_mse"], rel=1e-9)
    for scale in (0.0, fit.prior_scale * 0.9, fit.prior_scale * 1.1):
        other = fit_linear_model(train, fit.order, info["alpha"], info["alpha_cross"], info["alpha_prior"], prior, scale)
        assert mse(other) >= info["val_mse"] * (1 - 1e-9)


def _sparse_var(n: int, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stable VAR(1) with a sparse signed coupling (2 sources per target) and its series ``[N, T]``."""
    rng = np.random.default_rng(seed)
    a = np.zeros((n, n))
    for i in range(n):
        src = rng.choice(np.delete(np.arange(n), i), 2, replace=False)
        a[i, src] = rng.choice([-1, 1], 2) * rng.uniform(0.2, 0.35, 2)
    a += np.diag(rng.uniform(0.3, 0.5, n))
    a *= 0.9 / np.max(np.abs(np.linalg.eigvals(a)))
    x = np.zeros((n, steps))
    for t in range(1, steps):
        x[:, t] = a @ x[:, t - 1] + rng.standard_normal(n)
    return a, x


def test_an_informative_prior_is_chosen_on_validation_and_recovers_the_coupling():
    """With few training steps per coupling, a prior that marks the true sources (plus noise) is chosen on
    validation and recovers the coupling better than the fit without it; a prior can never raise the
    validation error (the candidates without it stay), not even a random one."""
    from twinbrain.scoring.linear import select_linear_model
    n = 20
    a, x = _sparse_var(n, 700, seed=3)
    train, val = [x[:, :400]], [x[:, 400:]]
    rng = np.random.default_rng(4)
    informative = (a != 0) * 1.0 + 0.2 * rng.random((n, n))
    plain, info0 = select_linear_model(train, val, orders=(1, 2), alphas=DEFAULT_ALPHAS)
    fit, info = select_linear_model(train, val, orders=(1, 2), alphas=DEFAULT_ALPHAS, prior=informative)
    _, info_rand = select_linear_model(train, val, orders=(1, 2), alphas=DEFAULT_ALPHAS, prior=rng.random((n, n)))
    off = ~np.eye(n, dtype=bool)
    r = lambda m: np.corrcoef(m.coef[0][off], a[off])[0, 1]
    assert info["alpha_prior"] is not None and info["val_mse"] < info0["val_mse"]
    assert r(fit) > r(plain) + 0.05, (r(fit), r(plain))
    assert info_rand["val_mse"] <= info0["val_mse"]
    assert info0["alpha_prior"] is None
