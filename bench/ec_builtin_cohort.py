"""EC of the twin's linear core on the built-in simulated cohort against the simulator's true coupling.

With the fMRI correction's gate closed (``train.gate_lr_scale`` 0, the default) the twin's fMRI forecast is
its warm-started linear core, so its perturbation EC (a unit pulse on region j at the last context step,
the forecast change averaged over h = 1..``--horizon``, :meth:`twinbrain.twin.Twin.effective_connectivity`)
is the core's in closed form (:func:`twinbrain.scoring.validity.linear_twin_ec` of the VAR(p)). This bench computes it for the core selected on validation with and without the coupling prior
(``model.coupling_prior: fc``, |r| of the training spans weighting the cross-node ridge penalty and giving the
lag-1 mean the couplings are shrunk towards), next to
the references ``twinbrain evaluate`` reports: the model's input FC graph (k-NN |r|) and the linear twin
(ridge VAR(1), ``eval.ridge_alpha``). Scores (``eval/twin_validity.ec_scores``) are against the test
subject's coupling. Several cohort sizes, recording lengths and simulation seeds; nothing is trained, so a
grid takes minutes. Writes ``results.json`` and ``results.md`` to ``--out``.

    python bench/ec_builtin_cohort.py --out runs/ec_builtin
    python bench/ec_builtin_cohort.py --regions 40 --minutes 6 --seeds 0 --out runs/ec_builtin_q
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


from twinbrain.config import load_config
from twinbrain.data.module import DataModule
from twinbrain.data.series import coupling_prior
from twinbrain.eval.forecast_eval import train_series
from twinbrain.eval.twin_validity import ec_scores, input_fc_graph
from twinbrain.scoring.linear import select_linear_model
from twinbrain.scoring.validity import fit_linear_twin, linear_twin_ec
from twinbrain.train.warm_start import core_orders

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("core_prior", "core_no_prior", "input_fc_graph", "linear_twin_var1")
SCORES = ("coupling_r", "coupling_auroc", "perturb_r")


def one_case(regions: int, minutes: float, seed: int, horizon: int, scratch: Path) -> dict:
    cfg = load_config(ROOT / "configs/quickstart.yaml",
                      ["--sim.n_regions", str(regions), "--sim.minutes", str(minutes), "--sim.seed", str(seed),
                       "--run.out", str(scratch / f"r{regions}_m{minutes:g}_s{seed}")])
    dm = DataModule(cfg).setup()
    train, val = train_series(dm, "fmri"), train_series(dm, "fmri", "val")
    subjects = list(dm.split.subjects["test"])
    orders = core_orders(cfg)
    prior = coupling_prior(cfg.model.coupling_prior, train, "fmri", cfg.graph.structural)
    t0 = time.process_time()
    with_prior, info_p = select_linear_model(train, val, orders, cfg.eval.baseline_alphas, prior=prior)
    cpu_prior = time.process_time() - t0
    no_prior, info_n = select_linear_model(train, val, orders, cfg.eval.baseline_alphas)
    ecs = {"core_prior": linear_twin_ec(with_prior.coef, horizon),
           "core_no_prior": linear_twin_ec(no_prior.coef, horizon),
           "input_fc_graph": input_fc_graph(dm),
           "linear_twin_var1": linear_twin_ec(fit_linear_twin(train, alpha=cfg.eval.ridge_alpha), horizon)}
    return {"regions": regions, "minutes": minutes, "seed": seed, "test_subjects": subjects,
            "train_trs": int(sum(s.shape[1] for s in train)),
            "scores": {k: ec_scores(v, dm.truth, subjects) for k, v in ecs.items()},
            "chosen": {"prior": info_p, "no_prior": info_n}, "select_cpu_s_with_prior": cpu_prior}


def table(cases: list[dict]) -> str:
    lines = ["| regions | minutes | seeds | " + " | ".join(f"{m} r / AUROC" for m in METHODS)
             + " | prior chosen | val MSE prior / none |", "|---" * (len(METHODS) + 5) + "|"]
    groups: dict[tuple, list[dict]] = {}
    for c in cases:
        groups.setdefault((c["regions"], c["minutes"]), []).append(c)
    for (r, m), cs in sorted(groups.items()):
        cell = []
        for meth in METHODS:
            rr = statistics.mean(c["scores"][meth]["coupling_r"] for c in cs)
            au = statistics.mean(c["scores"][meth]["coupling_auroc"] for c in cs)
            cell.append(f"{rr:.3f} / {au:.3f}")
        chosen = sum(c["chosen"]["prior"]["alpha_prior"] is not None or bool(c["chosen"]["prior"].get("prior_scale"))
                     for c in cs)
        mse = (statistics.mean(c["chosen"]["prior"]["val_mse"] for c in cs),
               statistics.mean(c["chosen"]["no_prior"]["val_mse"] for c in cs))
        lines.append(f"| {r} | {m:g} | {len(cs)} | " + " | ".join(cell) + f" | {chosen}/{len(cs)} | "
                     f"{mse[0]:.4f} / {mse[1]:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regions", type=int, nargs="+", default=[40, 80])
    ap.add_argument("--minutes", type=float, nargs="+", default=[6.0, 15.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--horizon", type=int, default=4, help="EC horizon in TRs (the quickstart's eval horizon)")
    ap.add_argument("--out", default="runs/ec_builtin")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load0, t0 = os.getloadavg(), time.perf_counter()
    cases = []
    with tempfile.TemporaryDirectory() as scratch:
        for r in a.regions:
            for m in a.minutes:
                for s in a.seeds:
                    cases.append(one_case(r, m, s, a.horizon, Path(scratch)))
                    sc = cases[-1]["scores"]
                    print(f"regions {r} minutes {m:g} seed {s}: " + ", ".join(
                        f"{k} {sc[k]['coupling_r']:.3f}/{sc[k]['coupling_auroc']:.3f}" for k in METHODS), flush=True)
    load1 = os.getloadavg()
    header = (f"Command: `python bench/ec_builtin_cohort.py --regions {' '.join(map(str, a.regions))} --minutes "
              f"{' '.join(f'{m:g}' for m in a.minutes)} --seeds {' '.join(map(str, a.seeds))}`; "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
              f"{platform.processor() or platform.machine()}, load {load0[0]:.1f} → {load1[0]:.1f}; "
              f"{time.perf_counter() - t0:.0f} s wall. EC horizon {a.horizon} TRs; r / AUROC of the off-diagonal "
              f"EC vs the test subject's coupling, mean over seeds.")
    (out / "results.json").write_text(json.dumps({"header": header, "cases": cases}, indent=1, default=float))
    (out / "results.md").write_text(header + "\n\n" + table(cases) + "\n")
    print(header + "\n\n" + table(cases))


if __name__ == "__main__":
    main()
