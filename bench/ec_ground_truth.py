"""Effective connectivity and forecasts of the twin on generated ground truth, against tuned baselines.

For every system (linear VAR(1), nonlinear rate network ``dx = (-x + C tanh x) dt + σ dξ``), size and seed:
simulate one series per subject (train / val / test subjects), warm-start the twin (the validation-tuned
ridge VAR in its linear core), train it briefly on CPU (best checkpoint chosen on validation), then score

* EC — off-diagonal Pearson r with the true ``C`` (row = target, column = source) of the twin's Jacobian,
  coupling and linear-core EC (``--core``: ``model.core``; for the transfer-flow core ``twin_linear`` is its
  ``W``, in signal units ``× sd_i``, no generator), a ridge VAR(1) (alpha chosen on validation), ``|corr|`` FC, and an NPI-style
  MLP surrogate (order 1, early-stopped on validation; EC = Jacobian of its one-step map averaged over
  test states);
* forecasts — R² on the TEST subjects at h = 1..5 of the twin and of the tuned baselines of
  :func:`twinbrain.eval.forecast_eval.evaluate_forecasts` (ridge VAR and per-node AR with order 1..3 and
  alpha chosen on validation, persistence, the MLP).

No hyper-parameter is chosen on test subjects. Writes ``results.json`` and ``results.md`` to ``--out``.

    python bench/ec_ground_truth.py --out runs/ec_gt            # default (~10 min on 2 CPU cores)
    python bench/ec_ground_truth.py --quick --out runs/ec_gt_q  # one seed, 20 nodes, fewer steps
    python bench/ec_ground_truth.py --core auto --out runs/ec_gt_auto   # core chosen on validation
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from twinbrain.config import load_config
from twinbrain.data.module import DataModule
from twinbrain.data.series import mean_abs_correlation, span_series
from twinbrain.data.simulate.systems import (offdiag_pearson, series_cohort, simulate_rate_network, simulate_var,
                                             sparse_signed_matrix)
from twinbrain.scoring.baselines import MLPBaseline
from twinbrain.scoring.linear import DEFAULT_ALPHAS, select_ridge_var
from twinbrain.eval.forecast_eval import evaluate_forecasts
from twinbrain.train.trainer import Trainer
from twinbrain.twin.loader import load_export
from twinbrain.twin.twin import Twin

ROOT = Path(__file__).resolve().parent.parent
HORIZONS = [1, 2, 3, 4, 5]
EC_METHODS = ("twin_jacobian", "twin_linear", "twin_coupling", "var1", "mlp", "fc")
ONE_STEP = ("twin_jacobian", "twin_linear", "var1", "mlp")     # one-TR gains: unit and time conversions apply
FORECASTERS = ("model", "svar", "var", "ar", "mlp", "persistence")   # svar = the twin's own step-0 core


def simulate(system: str, n: int, seed: int, a) -> tuple[np.ndarray, list[np.ndarray]]:
    """True ``C [n, n]`` and one ``[n, length]`` series per subject (independent noise per subject)."""
    rho = a.var_rho if system == "var" else a.rate_rho
    truth = sparse_signed_matrix(n, density=a.density, spectral_radius=rho, seed=1000 + seed)
    if system == "var":
        series = [simulate_var(truth, a.length, seed=100 * seed + i) for i in range(a.subjects)]
    else:
        series = [simulate_rate_network(truth, a.length, sigma=a.rate_sigma, seed=100 * seed + i)
                  for i in range(a.subjects)]
    return truth, series


def run_config(n: int, run_dir: Path, a, seed: int):
    """fMRI-only config at TR 1 s: 24-TR windows (19 context TRs + the 5 scored), 5 forecast steps."""
    args = ["--run.out", str(run_dir), "--sim.tr", "1.0", "--sim.eeg_sfreq", "1", "--model.eeg_patch", "1",
            "--model.eeg_stride", "1", "--data.window_s", "24", "--data.stride_s", str(a.stride),
            "--data.calib_s", "0", "--data.augment_noise", "0", "--sim.n_regions", str(n), "--sim.n_channels", "8",
            "--graph.k_fmri", "4", "--logging.wandb", "disabled", "--logging.progress", "off",
            "--logging.flops", "false", "--model.hidden", str(a.hidden), "--model.heads", "2",
            "--model.forecast_steps", "5", "--eval.horizons", json.dumps(HORIZONS),
            "--eval.baseline_orders", "[1, 2, 3]", "--model.linear_order", "3",
            "--data.val_subjects", "1", "--data.test_subjects", "1", "--train.seed", str(seed),
            "--train.max_steps", str(max(a.steps, 2)), "--train.warmup_steps", "1",
            "--train.eval_every", str(max(1, a.steps // 4)), "--train.checkpoint_every", str(max(a.steps, 2)),
            "--train.batch_size", "4", "--model.core", a.core]
    return load_config(ROOT / "configs/smoke.yaml", args + list(a.override))


def train_subjects(dm) -> list[int]:
    """Indices (into the simulated series, one subject each) of the training recordings."""
    return sorted({int(i) for i, _, _ in dm.split.train})


def mlp_ec(train: list[np.ndarray], val: list[np.ndarray], states: np.ndarray, steps: int, seed: int) -> np.ndarray:
    """EC of an NPI-style MLP surrogate: ``d x(t+1) / d x(t)`` of its one-step map, mean over ``states [M, N]``."""
    mlp = MLPBaseline(p=1, steps=steps, seed=seed).fit(train, val)
    z = torch.as_tensor(states, dtype=torch.float32)

    def step(v):                                   # the one-step map the baseline iterates (before clipping)
        return v + mlp.net(v)

    jac = torch.func.vmap(torch.func.jacrev(step))(z)          # [M, N_target, N_source]
    return jac.detach().mean(0).double().numpy()


def to_signal_units(ec: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """z-unit gain ``ec[i, j]`` (per node's SD) -> signal units of the simulator: ``ec[i, j] * sd_i / sd_j``."""
    return ec * sd[:, None] / sd[None, :]


def generator(step_matrix: np.ndarray) -> np.ndarray:
    """Continuous-time EC of a one-step (one-TR) linear map ``A``: ``logm(A)`` (per TR; real part). ``A`` =
    ``expm(TR · G)`` for a linear SDE ``dx = G x dt``, so this removes the indirect paths (``G²``, ...) that a
    one-TR gain accumulates; for the rate network ``G ≈ -I + C diag(tanh'(x))``."""
    return scipy.linalg.logm(step_matrix).real


def one_case(system: str, n: int, seed: int, a, scratch: Path) -> dict:
    t0 = time.process_time()
    truth, series = simulate(system, n, seed, a)
    run_dir = scratch / f"{system}_{n}_{seed}"
    cfg = run_config(n, run_dir, a, seed)
    dm = DataModule(cfg, cohort=series_cohort(series)).setup()
    train = span_series(dm.cohort, dm.stats, dm.split.train, "fmri")
    val = span_series(dm.cohort, dm.stats, dm.split.val, "fmri")
    test = span_series(dm.cohort, dm.stats, dm.split.test, "fmri")
    trainer = Trainer(cfg, data=dm)
    trainer.train()
    trainer.close()
    warm = trainer.warm["fmri"] if trainer.warm else {}
    best = load_export(run_dir / "best" / "model.pt", "cpu")       # chosen on validation (step 0 included)
    model, best_step = best.model, best.step
    twin = Twin(model, cfg, dm.metadata(), data=dm)
    t_train = time.process_time() - t0

    ws = twin.windows(split="test")
    pick = np.unique(np.linspace(0, len(ws) - 1, min(a.ec_windows, len(ws))).astype(int))
    windows = [ws[int(k)] for k in pick]
    t1 = time.process_time()
    ec = {"twin_jacobian": twin.effective_connectivity(windows, method="jacobian")}
    t_jac = time.process_time() - t1
    ec["twin_linear"] = twin.effective_connectivity(method="linear")
    ec["twin_coupling"] = twin.effective_connectivity(method="coupling")
    var1, _ = select_ridge_var(train, val, orders=[1], alphas=DEFAULT_ALPHAS)
    ec["var1"] = var1.coef[0]
    states = np.concatenate(test, axis=1).T[::max(1, sum(s.shape[1] for s in test) // a.mlp_states)]
    ec["mlp"] = mlp_ec(train, val, states, a.mlp_steps, seed)
    ec["fc"] = mean_abs_correlation(train)
    r = {k: offdiag_pearson(v, truth) for k, v in ec.items()}
    # The truth is in the simulator's units and in continuous time; the same two conversions for every
    # one-step matrix (twin Jacobian, twin linear core, VAR(1), MLP), so none is favoured.
    sd = np.mean([s.std(1) for s in (series[i] for i in train_subjects(dm))], axis=0)
    r_sig = {k: offdiag_pearson(to_signal_units(ec[k], sd), truth) for k in ONE_STEP}
    r_gen = {k: offdiag_pearson(to_signal_units(generator(ec[k]), sd), truth) for k in ONE_STEP}
    if warm.get("core") == "transfer":      # twin_linear = W of the flow: amplitude of a unit-free tanh, × sd_i
        r_sig["twin_linear"], r_gen["twin_linear"] = offdiag_pearson(sd[:, None] * ec["twin_linear"], truth), None

    with torch.enable_grad():
        res = evaluate_forecasts(model, dm, "test", cfg, device=torch.device("cpu"), mlp=True)
    f = res["forecast"]["fmri"]
    r2 = {"model": f["model"]["r2"], **{k: f["baselines"][k]["r2"] for k in FORECASTERS if k != "model"}}
    return {"system": system, "n": n, "seed": seed, "ec_r": r, "ec_r_signal": r_sig, "ec_r_generator": r_gen,
            "r2": r2,
            "tuning": {"warm_start": warm, "var1_alpha": var1.alpha, "var_r2": res["protocol"]["baseline_tuning"]},
            "best_step": best_step, "gate": float(model.gate["fmri"].weight.detach()),
            "cpu_s": {"simulate_train": t_train, "jacobian_ec": t_jac, "total": time.process_time() - t0},
            "ec_windows": len(windows)}


def _mean_sd(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    if not vals:
        return "n/a"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}"


def markdown(cases: list[dict], a, header: str) -> str:
    groups: dict[tuple[str, int], list[dict]] = {}
    for c in cases:
        groups.setdefault((c["system"], c["n"]), []).append(c)
    lines = [header, "", "EC: off-diagonal Pearson r with the true C (mean ± sd over seeds).", "",
             "| system | N | seeds | " + " | ".join(EC_METHODS) + " |",
             "|---|---|---|" + "---|" * len(EC_METHODS)]
    for (sys_, n), cs in groups.items():
        lines.append(f"| {sys_} | {n} | {len(cs)} | "
                     + " | ".join(_mean_sd([c["ec_r"][k] for c in cs]) for k in EC_METHODS) + " |")
    for key, what in (("ec_r_signal", "in signal units (z-gain × sd_i / sd_j)"),
                      ("ec_r_generator", "in signal units, continuous-time generator logm(one-TR matrix)")):
        lines += ["", f"EC {what}: off-diagonal r with the true C.", "",
                  "| system | N | " + " | ".join(ONE_STEP) + " |", "|---|---|" + "---|" * len(ONE_STEP)]
        for (sys_, n), cs in groups.items():
            lines.append(f"| {sys_} | {n} | " + " | ".join(_mean_sd([c[key][k] for c in cs]) for k in ONE_STEP) + " |")
    lines += ["", "Forecast R² on the test subjects (mean over seeds; model = the twin, var / ar = ridge VAR / "
              "per-node AR with order 1..3 and alpha chosen on validation).", "",
              "| system | N | forecaster | " + " | ".join(f"h={h}" for h in HORIZONS) + " |",
              "|---|---|---|" + "---|" * len(HORIZONS)]
    for (sys_, n), cs in groups.items():
        for k in FORECASTERS:
            vals = [[c["r2"][k][i] for c in cs] for i in range(len(HORIZONS))]
            lines.append(f"| {sys_} | {n} | {k} | "
                         + " | ".join(f"{np.mean([v for v in col if v is not None]):.4f}" for col in vals) + " |")
    lines += ["", "Per case: " + "; ".join(
        f"{c['system']}/{c['n']}/s{c['seed']}: core {c['tuning']['warm_start'].get('core', 'var')}, "
        f"best step {c['best_step']}, gate {c['gate']:.3f}, "
        f"Jacobian EC {c['cpu_s']['jacobian_ec']:.1f} CPU-s ({c['ec_windows']} windows), "
        f"total {c['cpu_s']['total']:.0f} CPU-s" for c in cases)]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The CLI (its defaults are the benchmark's simulation settings; ``bench/ec_transfer_core.py`` reuses them)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.json and results.md")
    p.add_argument("--systems", default="var,rate", help="comma list of var | rate")
    p.add_argument("--sizes", default="20,40", help="comma list of node counts")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (truth, noise and model)")
    p.add_argument("--subjects", type=int, default=5, help="series per case: 3 train, 1 val, 1 test")
    p.add_argument("--length", type=int, default=2000, help="TRs per subject")
    p.add_argument("--stride", type=int, default=12, help="window stride in TRs (TR = 1 s)")
    p.add_argument("--density", type=float, default=0.2, help="fraction of non-zero off-diagonal couplings")
    p.add_argument("--var-rho", type=float, default=0.8, help="spectral radius of the VAR(1) truth")
    p.add_argument("--rate-rho", type=float, default=1.5, help="spectral radius of C in the rate network")
    p.add_argument("--rate-sigma", type=float, default=0.5, help="noise σ of the rate network")
    p.add_argument("--steps", type=int, default=200, help="twin training steps after the warm start")
    p.add_argument("--hidden", type=int, default=16, help="model.hidden of the twin")
    p.add_argument("--ec-windows", type=int, default=16, help="test windows the Jacobian EC averages")
    p.add_argument("--mlp-steps", type=int, default=600, help="MLP surrogate training steps (early-stopped)")
    p.add_argument("--mlp-states", type=int, default=400, help="test states its Jacobian averages")
    p.add_argument("--quick", action="store_true", help="one seed, 20 nodes, 40 steps (~1-2 min)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--core", default="var", choices=("var", "transfer", "auto"),
                   help="model.core of the twin (auto: VAR or transfer flow, whichever has the lower val MSE)")
    p.add_argument("override", nargs="*", help="extra config overrides, e.g. --train.lr=3e-3 (after --)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.quick:
        a.seeds, a.sizes, a.steps, a.mlp_steps = "0", "20", 40, 300
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ec_gt_", dir=out))
    load0 = os.getloadavg()
    cases = []
    try:
        for system in a.systems.split(","):
            for n in [int(s) for s in a.sizes.split(",")]:
                for seed in [int(s) for s in a.seeds.split(",")]:
                    c = one_case(system, n, seed, a, scratch)
                    print(f"{system} N={n} seed={seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in c["ec_r"].items())
                          + f" | core {c['tuning']['warm_start'].get('core', 'var')}"
                          + f" | R2 h1 twin {c['r2']['model'][0]:.4f} var {c['r2']['var'][0]:.4f}"
                          + f" | {c['cpu_s']['total']:.0f} CPU-s", flush=True)
                    cases.append(c)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load1 = os.getloadavg()
    cmd = "python bench/ec_ground_truth.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"Command: `{cmd}`; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
              f"machine: 2-core CPU ({platform.processor() or platform.machine()}), {a.threads} torch thread(s), "
              f"torch {torch.__version__}; load average (1 min) {load0[0]:.2f} at start, {load1[0]:.2f} at end.")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "header": header, "cases": cases}, indent=2,
                                                 default=float))
    md = markdown(cases, a, header)
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
