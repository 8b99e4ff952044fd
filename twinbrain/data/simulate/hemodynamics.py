"""Balloon–Windkessel haemodynamics: neural drive -> BOLD signal.

State equations of Friston et al. (2000, 2003); parameters are the standard
priors of Stephan et al. (2007) / SPM (kappa 0.64, gamma 0.32, tau 2 s, alpha 0.32,
E0 0.4) and the observation equation uses their revised 3 T coefficients.  The
impulse response peaks at ~4.5 s with an undershoot around 12 s (Friston 2003's
faster kappa 0.65 / gamma 0.41 / tau 0.98 peaks at ~3.3 s, early for human BOLD).
Flow, volume and deoxyhaemoglobin are integrated in log space (as in Stephan
2007) so they stay positive whatever the drive does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BalloonParams:
    kappa: float = 0.64      # 1/s, decay of the vasodilatory signal
    gamma: float = 0.32      # 1/s, autoregulatory feedback of blood flow
    tau: float = 2.0         # s, haemodynamic transit time
    alpha: float = 0.32      # Grubb's exponent (volume-flow)
    rho: float = 0.4         # resting oxygen extraction fraction E0
    v0: float = 0.04         # resting venous blood volume fraction
    te: float = 0.04         # s, echo time (3 T)
    theta0: float = 40.3     # 1/s, frequency offset at the outer surface of magnetised vessels (3 T)
    r0: float = 25.0         # 1/s, intravascular relaxation rate slope
    epsilon: float = 1.0     # ratio of intra- to extravascular signal
    efficacy: float = 0.25   # neural efficacy: scales the drive into the vasodilatory signal

    @property
    def k(self) -> tuple[float, float, float]:
        """Observation coefficients k1, k2, k3 (Stephan et al. 2007)."""
        return (4.3 * self.theta0 * self.rho * self.te,
                self.epsilon * self.r0 * self.rho * self.te,
                1.0 - self.epsilon)


class Balloon:
    """Balloon–Windkessel state for an array of regions (any shape), float64.

    ``step(x, dt)`` advances by ``dt`` seconds (Euler; fine for dt <= ~50 ms)
    under drive ``x`` (relative change of neural activity, 0 at rest);
    ``bold()`` returns the BOLD signal in percent signal change.
    """

    def __init__(self, shape: tuple[int, ...], params: BalloonParams | None = None):
        self.p = params or BalloonParams()
        self.s = np.zeros(shape)         # vasodilatory signal
        self.lf = np.zeros(shape)        # log blood inflow
        self.lv = np.zeros(shape)        # log venous volume
        self.lq = np.zeros(shape)        # log deoxyhaemoglobin content

    def step(self, x: np.ndarray, dt: float) -> None:
        p = self.p
        # Floor the drive where steady-state flow would fall to 20% of rest: flow cannot stop.
        x = np.maximum(x, -0.8 * p.gamma / p.efficacy)
        f, v, q = np.exp(self.lf), np.exp(self.lv), np.exp(self.lq)
        v_out = v ** (1.0 / p.alpha)                          # outflow (Windkessel)
        extraction = (1.0 - (1.0 - p.rho) ** (1.0 / f)) / p.rho
        ds = p.efficacy * x - p.kappa * self.s - p.gamma * (f - 1.0)
        self.lf += dt * self.s / f
        self.lv += dt * (f - v_out) / (p.tau * v)
        self.lq += dt * (f * extraction - v_out * q / v) / (p.tau * q)
        self.s += dt * ds

    def bold(self) -> np.ndarray:
        """BOLD signal, percent change from rest (same shape as the state)."""
        k1, k2, k3 = self.p.k
        v, q = np.exp(self.lv), np.exp(self.lq)
        return 100.0 * self.p.v0 * (k1 * (1.0 - q) + k2 * (1.0 - q / v) + k3 * (1.0 - v))

    def map(self, fn) -> "Balloon":
        """A new Balloon whose state arrays are ``fn(array)`` (e.g. select or repeat groups)."""
        out = Balloon((0,), self.p)
        for name in ("s", "lf", "lv", "lq"):
            setattr(out, name, fn(getattr(self, name)))
        return out


def impulse_response(duration_s: float = 32.0, dt: float = 0.01,
                     params: BalloonParams | None = None) -> np.ndarray:
    """BOLD response (percent) to a 100 ms unit drive pulse, sampled every ``dt`` s: ``[n]``."""
    b = Balloon((1,), params)
    n = int(round(duration_s / dt))
    out = np.empty(n)
    for i in range(n):
        b.step(np.array([1.0 if i * dt < 0.1 else 0.0]), dt)
        out[i] = b.bold()[0]
    return out
