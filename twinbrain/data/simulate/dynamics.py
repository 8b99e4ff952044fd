"""Neural mass: noisy Stuart–Landau (Hopf) alpha oscillators gated by a slow activity.

Per region i (complex state z, time in seconds, W = coupling, ``W[i, j]`` = j -> i)::

    dz_i = { lam [ (a_i exp(beta eta_i) - |z_i|^2) z_i + sum_j W_ij (z_j - z_i) ] + i w_i z_i } dt
           + sigma sqrt(lam) dB_i
    tau d eta_i = [ -eta_i + tanh(sum_j W_ij eta_j) + I_i(t) ] dt + sigma_eta sqrt(2 tau) dB'_i

* z: fast alpha oscillator.  a_i < 0 keeps it below its Hopf bifurcation, so it
  is a noise-driven resonance at w_i / 2 pi ~ 8-12 Hz with a spectral peak
  ~ lam |a - d_i| / pi Hz wide (d_i = in-strength); Re(z) is the EEG source.
* eta: slow activity (infra-slow firing-rate fluctuation, tau = 2 s) coupled through
  the same connectome (tanh keeps it bounded at any gain).  It is the neural
  drive of BOLD, carries the perturbation input I to connected regions, and
  gates the alpha amplitude: more activity -> stronger damping (beta > 0) -> less
  alpha, so alpha power and BOLD are anti-correlated as in simultaneous EEG-fMRI
  (Goldman et al. 2002; Laufs et al. 2003).  The gate multiplies a < 0, so the
  oscillators never cross the Hopf point and paired runs with shared noise
  converge again after a pulse; log alpha power moves ~linearly with eta.
* a, eta, W and I are dimensionless (relative to the rate lam and the slow
  noise); a held input I raises eta by I.

Integration: exponential Euler–Maruyama at ``dt``.  The local part (damping,
rotation, alpha gating and the cubic saturation, frozen over a 20 ms block whose
length is far below their time scales) is applied as an exact exponential,
because plain Euler on a 10 Hz rotation at dt = 2 ms injects a spurious growth of
~4 /s, as large as the damping itself.  Coupling and noise are Euler steps.  The
slow activity and the haemodynamics advance once per block.  All groups
(subjects / runs) and copies (paired perturbation runs sharing noise) advance
together in one ``[G, R, Q]`` array; the only Python loop is over time steps.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

try:  # installed with scikit-learn (a nilearn dependency); optional
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

from .hemodynamics import Balloon

RATE = 4.0             # lam, 1/s: relaxation rate of the fast oscillator
A_BASE = -1.0          # bifurcation parameter (below the Hopf point)
DESYNC = 1.5           # beta: alpha damping grows as exp(beta * eta) with slow activity
ALPHA_HZ = 10.0        # mean alpha frequency
ALPHA_SPREAD_HZ = 1.0  # regional spread of the alpha frequency
TAU_SLOW = 2.0         # s, slow activity time constant
SIGMA_SLOW = 0.3       # stationary std of the uncoupled slow activity
BLOCK_S = 0.02         # s, step of the slow activity (at most)
HEMO_S = 0.1           # s, step of the haemodynamics (at most): Balloon time constants are >= 1 s


@dataclass
class NeuralParams:
    """Parameters of G independent networks (one per subject or run).

    coupling: ``[G, R, R]`` dimensionless, ``coupling[g, i, j]`` = influence of j on i.
    a: ``[G, R]`` bifurcation parameter (< 0).  freq_hz: ``[G, R]`` intrinsic frequency (Hz).
    noise: sigma, amplitude of the complex state noise.
    """
    coupling: np.ndarray
    a: np.ndarray
    freq_hz: np.ndarray
    noise: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.a.shape

    def damping(self) -> np.ndarray:
        """``[G, R]`` local damping d_i - a_i > 0 at eta = 0 (d_i = in-strength, diffusive coupling)."""
        return self.coupling.sum(axis=2) - self.a

    def ref_power(self) -> np.ndarray:
        """``[G, R]`` stationary E|z|^2 of an isolated region at eta = 0: sigma^2 / (d - a)."""
        return self.noise ** 2 / self.damping()


@dataclass
class Timing:
    """Nested time grid, each level a whole number of the one below.

    ``n_sub`` integration steps per EEG sample, ``block`` samples per slow-activity
    step, ``hemo`` blocks per haemodynamic step, ``samples_per_tr`` samples per volume.
    """
    sfreq: float
    samples_per_tr: int
    n_sub: int
    block: int
    hemo: int

    @classmethod
    def build(cls, sfreq: float, tr: float, dt_ms: float) -> "Timing":
        spt = tr * sfreq
        if abs(spt - round(spt)) > 1e-6:
            raise ValueError(f"TR {tr} s x {sfreq} Hz = {spt} EEG samples per volume is not a whole "
                             f"number; validate the config with twinbrain.config.load_config")
        spt = int(round(spt))
        # Round the step down so a whole number of steps fits in one EEG sample.
        n_sub = max(1, math.ceil(1000.0 / (sfreq * dt_ms) - 1e-9))
        block = _largest_divisor(spt, math.floor(BLOCK_S * sfreq + 1e-9))
        hemo = _largest_divisor(spt // block, math.floor(HEMO_S * sfreq / block + 1e-9))
        return cls(sfreq, spt, n_sub, block, hemo)

    @property
    def dt(self) -> float:
        return 1.0 / (self.sfreq * self.n_sub)

    @property
    def block_s(self) -> float:
        return self.block / self.sfreq


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, at_most) + 1) if n % d == 0)


@dataclass
class NetworkState:
    """State of G networks x R regions x Q copies."""
    z: np.ndarray        # [G, R, Q] complex64 fast oscillator
    eta: np.ndarray      # [G, R, Q] float64 slow activity
    hemo: Balloon        # [G, R, Q] haemodynamic state

    @classmethod
    def initial(cls, params: NeuralParams, rngs: list[np.random.Generator]) -> "NetworkState":
        """Random start near the stationary state (Q = 1); the burn-in removes what remains."""
        g, r = params.shape
        amp = np.sqrt(params.ref_power() / 2.0)
        z = np.empty((g, r, 1), np.complex64)
        eta = np.empty((g, r, 1))
        for i, rng in enumerate(rngs):
            z[i, :, 0] = amp[i] * (rng.standard_normal(r) + 1j * rng.standard_normal(r))
            eta[i, :, 0] = SIGMA_SLOW * rng.standard_normal(r)
        return cls(z, eta, Balloon((g, r, 1)))

    def select(self, groups: list[int]) -> "NetworkState":
        """A copy holding only the given groups."""
        return NetworkState(self.z[groups], self.eta[groups], self.hemo.map(lambda x: x[groups]))

    def tile(self, copies: int) -> "NetworkState":
        """Q = ``copies`` identical copies of a Q = 1 state (for paired runs)."""
        rep = lambda x: np.repeat(x, copies, axis=2)  # noqa: E731
        return NetworkState(rep(self.z), rep(self.eta), self.hemo.map(rep))


@dataclass
class Stimulus:
    """Input I added to the slow activity: ``weights`` ``[G, R, Q]`` during [start_s, stop_s)."""
    weights: np.ndarray
    start_s: float
    stop_s: float


@dataclass
class Segment:
    """Output of ``integrate`` over ``n_tr`` volumes.

    eeg: ``[G, Q, C, S]`` float32 gain @ Re(z) at ``sfreq`` (None without a gain).
    bold: ``[G, Q, R, n_tr]`` float64 BOLD (percent), the mean over each TR.
    drive: ``[G, Q, R, n_blocks]`` float32 neural drive of BOLD (eta) per slow block, if recorded.
    """
    eeg: np.ndarray | None
    bold: np.ndarray
    drive: np.ndarray | None


def integrate(params: NeuralParams, state: NetworkState, rngs: list[np.random.Generator],
              timing: Timing, n_tr: int, *, gain: np.ndarray | None = None,
              stimulus: Stimulus | None = None, record_drive: bool = False) -> Segment:
    """Advance ``state`` in place by ``n_tr`` volumes (``n_tr * samples_per_tr`` EEG samples).

    ``rngs[g]`` supplies group g's noise, shared by its Q copies, so paired copies
    differ only through the stimulus.  ``gain`` ``[C, R]`` projects Re(z) to EEG.
    """
    # Every product here is small; multi-threaded BLAS only adds synchronisation,
    # which cost 4-10x on a shared 2-core machine.
    limit = threadpool_limits(1, user_api="blas") if threadpool_limits else contextlib.nullcontext()
    with limit:
        return _integrate(params, state, rngs, timing, n_tr, gain, stimulus, record_drive)


def _integrate(params: NeuralParams, state: NetworkState, rngs: list[np.random.Generator],
               timing: Timing, n_tr: int, gain: np.ndarray | None, stimulus: Stimulus | None,
               record_drive: bool) -> Segment:
    g_n, r_n, q_n = state.z.shape
    dt, spt, n_sub, blk = timing.dt, timing.samples_per_tr, timing.n_sub, timing.block
    n_steps, blocks_per_tr, dt_blk = spt * n_sub, spt // blk, timing.block_s
    lam_dt = RATE * dt

    w = params.coupling.astype(np.float32)
    w_dt = np.float32(lam_dt) * w                                              # [G, R, R]
    a_dt = (lam_dt * params.a)[..., None]                                     # [G, R, 1], < 0
    d_dt = (lam_dt * params.coupling.sum(axis=2))[..., None]                  # diffusive-coupling loss
    rot = np.exp(2j * np.pi * dt * params.freq_hz)[..., None].astype(np.complex64)  # per-step rotation
    amp = np.float32(params.noise * math.sqrt(lam_dt))
    slow_amp = SIGMA_SLOW * math.sqrt(2 * dt_blk / TAU_SLOW)

    z = np.ascontiguousarray(state.z)
    zr = z.view(np.float32).reshape(g_n, r_n, 2 * q_n)                         # [re, im] pairs
    czr = np.empty_like(zr)
    cz = czr.view(np.complex64).reshape(z.shape)
    noise = np.empty((g_n, n_steps, r_n, 2), np.float32)
    nz = noise.view(np.complex64)                                              # [G, n_steps, R, 1]
    slow_noise = np.empty((g_n, blocks_per_tr, r_n, 1))
    re_buf = np.empty((g_n, q_n, spt, r_n), np.float32) if gain is not None else None
    gain_t = None if gain is None else np.ascontiguousarray(gain.T, dtype=np.float32)

    eeg = None if gain is None else np.empty((g_n, q_n, len(gain), n_tr * spt), np.float32)
    bold = np.empty((g_n, q_n, r_n, n_tr))
    drive = np.empty((g_n, q_n, r_n, n_tr * blocks_per_tr), np.float32) if record_drive else None
    eta, hemo = state.eta, state.hemo
    eta_sum = np.zeros_like(eta)

    for t in range(n_tr):
        for gi, rng in enumerate(rngs):
            rng.standard_normal(dtype=np.float32, out=noise[gi])
            rng.standard_normal(out=slow_noise[gi, ..., 0])
        noise *= amp
        bold_acc = np.zeros(z.shape)
        k = 0
        for b in range(blocks_per_tr):
            # Slow activity, then the local factor frozen over this block.
            t_blk = (t * blocks_per_tr + b) * dt_blk
            drive_in = np.tanh(np.matmul(w, eta.astype(np.float32)))
            if stimulus is not None and stimulus.start_s <= t_blk < stimulus.stop_s:
                drive_in = drive_in + stimulus.weights
            eta += (dt_blk / TAU_SLOW) * (drive_in - eta) + slow_amp * slow_noise[:, b]
            power = z.real ** 2 + z.imag ** 2
            log_amp = a_dt * np.exp(DESYNC * eta) - d_dt - lam_dt * power   # per-step log-amplitude change
            e_blk = rot * np.exp(log_amp.astype(np.float32))
            for s in range(blk):
                if re_buf is not None:
                    re_buf[:, :, b * blk + s] = z.real.transpose(0, 2, 1)
                for _ in range(n_sub):
                    np.matmul(w_dt, zr, out=czr)         # lam dt sum_j W_ij z_j
                    z *= e_blk
                    z += cz
                    z += nz[:, k]
                    k += 1
            if drive is not None:
                drive[..., t * blocks_per_tr + b] = eta.transpose(0, 2, 1)
            eta_sum += eta
            if (b + 1) % timing.hemo == 0:
                hemo.step(eta_sum / timing.hemo, timing.hemo * dt_blk)
                eta_sum.fill(0.0)
                bold_acc += hemo.bold()
        bold[..., t] = (bold_acc * (timing.hemo / blocks_per_tr)).transpose(0, 2, 1)
        if eeg is not None:
            # [G, Q, S, R] @ [R, C] -> [G, Q, S, C]
            eeg[..., t * spt:(t + 1) * spt] = np.matmul(re_buf, gain_t).swapaxes(-1, -2)
    state.z = z
    return Segment(eeg, bold, drive)
