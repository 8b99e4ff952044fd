"""Would a tanh term in the linear core help EC on the rate network? A closed-form check before a model change.

Fits, on z-scored training subjects, a ridge VAR(1) ``x(t+1) = A x(t) + b`` and a "tanh core"
``x(t+1) = A x(t) + B tanh(s x(t)) + b`` (alpha chosen on the validation subject, per ``s``), and scores
the off-diagonal Pearson r with the true C of ``A`` and of the tanh core's Jacobian
``A + B diag(s tanh'(s x))`` averaged over test states, plus one-step test MSE. Same systems, seeds and
splits (3 train / 1 val / 1 test subjects) as bench/ec_ground_truth.py.

    python bench/ec_tanh_core_check.py [--sizes 20,40] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import datetime
import os

import numpy as np

from twinbrain.data.simulate.systems import offdiag_pearson, simulate_rate_network, sparse_signed_matrix

ALPHAS = (0.1, 1.0, 10.0, 100.0, 1e3)


def pairs(series: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``[N, T]`` series -> inputs ``[M, N]`` at t and targets ``[M, N]`` at t + 1."""
    return (np.concatenate([s[:, :-1] for s in series], 1).T, np.concatenate([s[:, 1:] for s in series], 1).T)


def ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``[D, N]`` and intercept ``[N]`` (intercept unpenalised: centred features)."""
    xm, ym = x.mean(0), y.mean(0)
    w = np.linalg.solve((x - xm).T @ (x - xm) + alpha * np.eye(x.shape[1]), (x - xm).T @ (y - ym))
    return w, ym - xm @ w


def tuned(feat, x, y, xv, yv):
    """The ridge fit whose alpha gives the lowest validation MSE."""
    fits = [ridge(feat(x), y, a) for a in ALPHAS]
    return min(fits, key=lambda f: float(((feat(xv) @ f[0] + f[1] - yv) ** 2).mean()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20,40")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--length", type=int, default=2000)
    a = p.parse_args()
    scales = (0.5, 1.0, 2.0)
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load {os.getloadavg()[0]:.2f}")
    print("| N | seed | VAR(1) r | VAR(1) test MSE | " + " | ".join(f"tanh s={s} r | MSE" for s in scales) + " |")
    print("|---|---|---|---|" + "---|---|" * len(scales))
    for n in [int(v) for v in a.sizes.split(",")]:
        for seed in [int(v) for v in a.seeds.split(",")]:
            truth = sparse_signed_matrix(n, 0.2, 1.5, 1000 + seed)       # as bench/ec_ground_truth.py
            raw = [simulate_rate_network(truth, a.length, sigma=0.5, seed=100 * seed + i) for i in range(5)]
            z = [(s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True) for s in raw]
            (x, y), (xv, yv), (xt, yt) = pairs(z[:3]), pairs(z[3:4]), pairs(z[4:])
            w, b = tuned(lambda v: v, x, y, xv, yv)
            row = [offdiag_pearson(w.T, truth), float(((xt @ w + b - yt) ** 2).mean())]
            for s in scales:
                def feat(v, s=s):
                    return np.concatenate([v, np.tanh(s * v)], 1)
                w, b = tuned(feat, x, y, xv, yv)
                lin, nl = w[:n].T, w[n:].T
                jac = lin + (nl[None] * (s / np.cosh(s * xt) ** 2)[:, None, :]).mean(0)
                row += [offdiag_pearson(jac, truth), float(((feat(xt) @ w + b - yt) ** 2).mean())]
            print(f"| {n} | {seed} | " + " | ".join(f"{v:.4f}" for v in row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
