"""Does a sigmoid-transfer (MINDy-style) model recover the rate network's coupling better than ridge VAR(1)?

Closed form (numpy) except ``ct`` (torch L-BFGS; the fits are ``twinbrain.scoring.baselines``' ``TransferMap``,
``select_transfer`` and ``TransferFlow``, the twin's ``model.core: transfer``), no twin training: the systems, sizes, seeds and subject split of ``bench/ec_ground_truth.py`` (its
:func:`simulate` and argument defaults; 3 train / 1 validation / 1 test subject per case), and closed-form
models fitted on the training subjects, every hyper-parameter chosen by one-step MSE on the validation
subject, scored on the test subject. Models (``x`` = one region's series, ``t`` in TRs):

* ``var1`` — ridge VAR(1), alpha on validation (the issue's reference, r = 0.91 on the rate network);
* ``var`` — ridge VAR(p), p = 1..3 and alpha on validation (forecast reference);
* ``mindy`` — MINDy (Singh et al. 2020, NeuroImage 221:117046): ``x_i(t+1) = c_i + d_i x_i(t) +
  Σ_j W_ij tanh(b x_j(t))`` (``d_i = 1 - D_i``: own linear decay; all cross-region input through the
  transfer), one shared slope ``b`` and ridge alpha chosen on validation; EC = ``W``;
* ``mindy_pr`` — the same with a slope ``b_j`` per region (fitted on training by variable projection:
  ``W, d, c`` in closed form for given slopes, L-BFGS on ``log b``), EC = ``diag(b) W`` (``W`` in the
  coordinates where every transfer has unit slope, so invariant to each region's scale);
* ``hybrid`` — ridge VAR(1) plus the transfer term, ``x(t+1) = c + A x(t) + W tanh(b x(t))``, ``b`` and
  alpha on validation; EC = ``W`` and ``A + b W`` (its gain at 0);
* ``ct`` — continuous-time MINDy: ``x(t+1)`` = the flow over one TR (RK4, ``--ct-substeps`` steps) of
  ``dx/dt = c - D x + W tanh(b x)`` (``D`` diagonal), ``b`` = the ``mindy`` slope chosen on validation,
  ``W, D, c`` by L-BFGS (torch autograd) on the training one-step MSE from the ``mindy`` fit; EC = ``W``.
  A one-TR map carries indirect paths (``C²``, ...); the flow's generator does not. Not closed form;
  ``ct_or_mindy`` = whichever of ``ct`` and ``mindy`` has the lower validation one-step MSE;
* ``ceiling_z`` — not a model: r of the true ``C`` rescaled to z-units (``C_ij · sd_j / sd_i``), what a
  exact estimate of ``C`` scores once expressed in the z-units it is fitted in.

Normalisation (``--norm``): ``rec`` = what the twin does (each training subject z-scored with its own
mean/SD, held-out subjects with the training subjects' pooled statistics); ``group`` = every subject
with the pooled training statistics; ``none`` = the simulator's units. EC r = off-diagonal Pearson r
with the true ``C`` (row = target, column = source) of the matrix as fitted (the units it was fitted
in), and for the rate network also after the unit conversion of ``bench/ec_ground_truth.py``
(``to_signal_units``: one-step gains ``× sd_i / sd_j``; a transfer amplitude ``W`` maps a unit-free
``tanh`` to region ``i``, so ``× sd_i``) and, for VAR(1), its continuous-time generator ``logm``.
Forecasts: R² = 1 - SSE / SST (SST about the test subject's per-region mean) at h = 1..5 on every test
time step, iterating each one-step map on its own predictions.

    python bench/ec_transfer_core.py                       # rate + var, 20 and 40 nodes, seeds 0-2, rec + none
                                                           # (~10 min on 2 shared cores)
    python bench/ec_transfer_core.py --systems rate --norm none,rec
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
from scipy.optimize import minimize

from twinbrain.data.simulate.systems import offdiag_pearson
from twinbrain.scoring.linear import DEFAULT_ALPHAS, select_ridge_var
from twinbrain.scoring.series import step_pairs as pairs
from twinbrain.scoring.transfer import TransferFlow, TransferMap as Transfer, select_transfer

HERE = Path(__file__).resolve().parent
HORIZONS = (1, 2, 3, 4, 5)


def _bench():
    """``bench/ec_ground_truth.py`` as a module (its ``simulate`` and CLI defaults)."""
    spec = importlib.util.spec_from_file_location("ec_ground_truth", HERE / "ec_ground_truth.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def normalise(series: list[np.ndarray], how: str) -> tuple[list, list, list, np.ndarray]:
    """Split 3 / 1 / 1 and scale; returns train, val, test series and the training subjects' mean SD ``[N]``."""
    tr = series[:3]
    cat = np.concatenate(tr, 1)
    g_mu, g_sd = cat.mean(1, keepdims=True), cat.std(1, keepdims=True)
    sd = np.mean([s.std(1) for s in tr], axis=0)
    if how == "none":
        return list(tr), [series[3]], [series[4]], sd
    held = [(series[3] - g_mu) / g_sd], [(series[4] - g_mu) / g_sd]
    if how == "group":
        return [(s - g_mu) / g_sd for s in tr], *held, sd
    return [(s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True) for s in tr], *held, sd


def mse(y: np.ndarray, pred: np.ndarray) -> float:
    return float(((y - pred) ** 2).mean())


def fit_per_region_slopes(tr, va, b0: float, alpha: float, maxiter: int):
    """Slopes ``b_j`` by L-BFGS on the training one-step MSE (``W, d, c`` re-solved in closed form)."""
    xt, yt = pairs(tr)
    n = xt.shape[0]

    def obj(lb):
        mod = Transfer(np.exp(lb), False).fit(xt, yt, alpha)
        return mse(yt, mod.step(xt))

    res = minimize(obj, np.full(n, np.log(b0)), method="L-BFGS-B", bounds=[(np.log(0.02), np.log(10.0))] * n,
                   options={"maxiter": maxiter})
    mod = Transfer(np.exp(res.x), False).fit(xt, yt, alpha)
    xv, yv = pairs(va)
    return mod, {"val_mse": mse(yv, mod.step(xv)), "b_mean": float(np.exp(res.x).mean())}


def var_step(fit):
    """One-step map of a :class:`RidgeVAR` on a lag stack ``[p, N, M]`` (lag 1 first)."""
    return lambda lags: fit.intercept[:, None] + sum(fit.coef[k] @ lags[k] for k in range(fit.order))


def forecast_r2(step, order: int, test: list[np.ndarray], horizons=HORIZONS) -> list[float]:
    """R² at each horizon of iterating ``step(lags [p, N, M]) -> [N, M]`` from every test time step."""
    out = []
    for s in test:
        h_max, t_len = max(horizons), s.shape[1]
        starts = np.arange(order - 1, t_len - h_max)               # last context step
        lags = [s[:, starts - k] for k in range(order)]
        preds = []
        for _ in range(h_max):
            y = step(np.stack(lags))
            preds.append(y)
            lags = [y] + lags[:-1]
        mu = s.mean(1, keepdims=True)
        for h in horizons:
            tgt = s[:, starts + h]
            out.append(1.0 - ((tgt - preds[h - 1]) ** 2).sum() / ((tgt - mu) ** 2).sum())
    return [float(v) for v in out]


def one_case(bench, system: str, n: int, seed: int, norm: str, a) -> dict:
    truth, series = bench.simulate(system, n, seed, a)
    tr, va, te, sd = normalise(series, norm)
    ec, tuning, r2 = {}, {}, {}
    var1, _ = select_ridge_var(tr, va, orders=[1], alphas=DEFAULT_ALPHAS)
    var, _ = select_ridge_var(tr, va, orders=[1, 2, 3], alphas=DEFAULT_ALPHAS)
    ec["var1"], tuning["var1"], tuning["var"] = var1.coef[0], {"alpha": var1.alpha}, {"order": var.order,
                                                                                      "alpha": var.alpha}
    mindy, tuning["mindy"] = select_transfer(tr, va, full_linear=False)
    hyb, tuning["hybrid"] = select_transfer(tr, va, full_linear=True)
    pr, tuning["mindy_pr"] = fit_per_region_slopes(tr, va, tuning["mindy"]["b"], tuning["mindy"]["alpha"], a.maxiter)
    ct = TransferFlow(mindy, a.ct_substeps).fit(*pairs(tr), a.ct_iters)
    tuning["ct"] = {"b": tuning["mindy"]["b"], "val_mse": mse(pairs(va)[1], ct.step(pairs(va)[0]))}
    ec["mindy"], ec["mindy_pr"], ec["ct"] = mindy.w, pr.b[:, None] * pr.w, ct.w
    use_ct = tuning["ct"]["val_mse"] < tuning["mindy"]["val_mse"]          # discrete or continuous, on val
    tuning["ct_or_mindy"] = "ct" if use_ct else "mindy"
    ec["ct_or_mindy"] = ct.w if use_ct else mindy.w
    ec["hybrid_W"], ec["hybrid_gain"] = hyb.w, hyb.lin + hyb.w * hyb.b[None, :]
    r = {k: offdiag_pearson(v, truth) for k, v in ec.items()}
    # Ceiling of any matrix in z-units: the true C itself rescaled to them (C_ij · sd_j / sd_i).
    r["ceiling_z"] = offdiag_pearson(truth * sd[None, :] / sd[:, None], truth) if norm != "none" else 1.0
    if norm != "none":                                          # back to the simulator's units
        conv = {"var1": bench.to_signal_units(var1.coef[0], sd), "mindy": sd[:, None] * mindy.w,
                "mindy_b": bench.to_signal_units(mindy.w * mindy.b[None, :], sd),
                "hybrid_W": sd[:, None] * hyb.w, "ct": sd[:, None] * ct.w,
                "ct_or_mindy": sd[:, None] * ec["ct_or_mindy"], "hybrid_gain": bench.to_signal_units(ec["hybrid_gain"], sd)}
        conv["var1_logm"] = bench.to_signal_units(scipy.linalg.logm(var1.coef[0]).real, sd)
    else:
        conv = {"var1_logm": scipy.linalg.logm(var1.coef[0]).real}
    r.update({f"sig:{k}": offdiag_pearson(v, truth) for k, v in conv.items()})
    xe, ye = pairs(te)
    one = {"var1": mse(ye, var_step(var1)(xe[None])), "var": None, "mindy": mse(ye, mindy.step(xe)),
           "mindy_pr": mse(ye, pr.step(xe)), "hybrid": mse(ye, hyb.step(xe)),
           "ct": mse(ye, ct.step(xe))}
    for name, fit in (("var1", var1), ("var", var)):
        r2[name] = forecast_r2(var_step(fit), fit.order, te)
    for p in (2, 3):
        fit, _ = select_ridge_var(tr, va, orders=[p], alphas=DEFAULT_ALPHAS)
        r2[f"var{p}"] = forecast_r2(var_step(fit), p, te)
    for name, mod in (("mindy", mindy), ("mindy_pr", pr), ("hybrid", hyb), ("ct", ct)):
        r2[name] = forecast_r2(lambda lags, m=mod: m.step(lags[0]), 1, te)
    return {"system": system, "n": n, "seed": seed, "norm": norm, "ec_r": r, "test_mse1": one, "r2": r2,
            "tuning": tuning}


def _ms(vals) -> str:
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}"


def markdown(cases: list[dict]) -> str:
    groups: dict = {}
    for c in cases:
        groups.setdefault((c["norm"], c["system"], c["n"]), []).append(c)
    keys = list(dict.fromkeys(k for c in cases for k in c["ec_r"]))
    lines = ["EC: off-diagonal Pearson r with the true C (mean ± sd over seeds; `sig:` = in the simulator's units).",
             "", "| norm | system | N | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for (norm, sys_, n), cs in groups.items():
        lines.append(f"| {norm} | {sys_} | {n} | " + " | ".join(
            _ms([c["ec_r"].get(k) for c in cs]) if any(k in c["ec_r"] for c in cs) else "–" for k in keys) + " |")
    fk = list(cases[0]["r2"])
    lines += ["", "Forecast R² on the test subject (mean over seeds), h = " + ", ".join(map(str, HORIZONS)) + ".",
              "", "| norm | system | N | model | " + " | ".join(f"h={h}" for h in HORIZONS) + " |",
              "|---|---|---|---|" + "---|" * len(HORIZONS)]
    for (norm, sys_, n), cs in groups.items():
        for k in fk:
            lines.append(f"| {norm} | {sys_} | {n} | {k} | " + " | ".join(
                f"{np.mean([c['r2'][k][i] for c in cs]):.4f}" for i in range(len(HORIZONS))) + " |")
    lines += ["", "Chosen on validation per case: " + "; ".join(
        f"{c['norm']}/{c['system']}/{c['n']}/s{c['seed']}: var p={c['tuning']['var']['order']}, "
        f"mindy b={c['tuning']['mindy']['b']} α={c['tuning']['mindy']['alpha']:g}, "
        f"hybrid b={c['tuning']['hybrid']['b']} α={c['tuning']['hybrid']['alpha']:g}, "
        f"ct_or_mindy → {c['tuning']['ct_or_mindy']}" for c in cases)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    bench = _bench()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="rate,var", help="comma list of rate | var")
    p.add_argument("--sizes", default="20,40", help="comma list of node counts")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (truth and noise)")
    p.add_argument("--norm", default="rec,none", help="comma list of rec | group | none (see the docstring)")
    p.add_argument("--maxiter", type=int, default=30, help="L-BFGS iterations of the per-region slopes")
    p.add_argument("--ct-substeps", type=int, default=4, help="RK4 steps per TR of the ct model")
    p.add_argument("--ct-iters", type=int, default=150, help="L-BFGS iterations of the ct model")
    p.add_argument("--out", default=None, help="optional folder for results.json / results.md")
    a = p.parse_args(argv)
    # The ground-truth benchmark's simulation defaults (subjects, length, density, rho, sigma).
    d = bench_defaults(bench)
    for k, v in d.items():
        setattr(a, k, v)
    cases = []
    for norm in a.norm.split(","):
        for system in a.systems.split(","):
            for n in [int(s) for s in a.sizes.split(",")]:
                for seed in [int(s) for s in a.seeds.split(",")]:
                    t0 = time.process_time()
                    c = one_case(bench, system, n, seed, norm, a)
                    print(f"{norm} {system} N={n} s={seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in c["ec_r"].items())
                          + f" | h1 var {c['r2']['var'][0]:.4f} mindy {c['r2']['mindy'][0]:.4f} ct "
                          f"{c['r2']['ct'][0]:.4f} | {time.process_time() - t0:.0f} CPU-s", flush=True)
                    cases.append(c)
    md = markdown(cases)
    print(md)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"argv": sys.argv[1:], "cases": cases}, indent=1, default=float))
        (out / "results.md").write_text(md)
    return 0


def bench_defaults(bench) -> dict:
    """The simulation arguments of ``bench/ec_ground_truth.py`` at their defaults."""
    d = vars(bench.build_parser().parse_args(["--out", "-"]))
    return {k: d[k] for k in ("subjects", "length", "density", "var_rho", "rate_rho", "rate_sigma")}


if __name__ == "__main__":
    raise SystemExit(main())
