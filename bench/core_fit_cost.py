"""CPU cost of the twin's warm start (the closed-form core selection) against atlas size.

For N regions, ``--train`` training and one validation series of ``--length`` TRs (a stable random VAR(1),
so every candidate has a finite error), times :func:`twinbrain.scoring.transfer.select_core_model` with the
default grids (orders 1..5, the seven alphas) for ``var`` without a prior, ``var`` with a dense |FC| prior
(the default ``model.coupling_prior: fc``) and ``auto`` (the ridge VAR and the transfer flow, whose
slope/alpha search is N per-target solves of (N + 1)² systems per candidate). CPU seconds of this process
(``time.process_time``), one thread. Writes JSON lines to stdout.

    OMP_NUM_THREADS=1 python bench/core_fit_cost.py --regions 40 80 200
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from twinbrain.data.series import mean_abs_correlation
from twinbrain.scoring.transfer import select_core_model


def series(n: int, length: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n)) * (rng.random((n, n)) < 0.1) * 0.3 + np.diag(rng.uniform(0.5, 0.8, n))
    a *= 0.9 / np.max(np.abs(np.linalg.eigvals(a)))
    out = []
    for _ in range(count):
        x = np.zeros((n, length))
        for t in range(1, length):
            x[:, t] = a @ x[:, t - 1] + rng.standard_normal(n)
        out.append((x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regions", type=int, nargs="+", default=[40, 80, 200])
    ap.add_argument("--length", type=int, default=1200)
    ap.add_argument("--train", type=int, default=5)
    ap.add_argument("--cores", nargs="+", default=["var", "var+prior", "auto"])
    a = ap.parse_args()
    for n in a.regions:
        data = series(n, a.length, a.train + 1, seed=n)
        train, val = data[:-1], data[-1:]
        for core in a.cores:
            prior = mean_abs_correlation(train) if core == "var+prior" else None
            t0, w0 = time.process_time(), time.perf_counter()
            _, info = select_core_model(train, val, core=core.split("+")[0], prior=prior)
            print(json.dumps({"regions": n, "core": core, "cpu_s": round(time.process_time() - t0, 2),
                              "wall_s": round(time.perf_counter() - w0, 2), "chosen": info["core"],
                              "alpha_prior": info.get("alpha_prior"), "val_mse": round(info["val_mse"], 5),
                              "load_avg": round(os.getloadavg()[0], 2),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}), flush=True)


if __name__ == "__main__":
    main()
