"""EEG sensors (MNE's built-in 10-20 montage) and a dipole lead field.

The gain is the potential of a current dipole in an infinite homogeneous
conductor, ``V = p . (r_e - r_d) / |r_e - r_d|^3`` (1/r^2 fall-off with
orientation), re-referenced to the channel average as real EEG usually is.
"""
from __future__ import annotations

import warnings

import numpy as np

# Aliases (T3/T4/T5/T6 repeat T7/T8/P7/P8) and ear/mastoid references are never scalp channels.
_NOT_SCALP = {"T3", "T4", "T5", "T6", "M1", "M2", "A1", "A2"}


def _montage_positions() -> tuple[list[str], np.ndarray]:
    """All 10-20/10-10 scalp electrodes of MNE's standard montage: names, ``[N, 3]`` m."""
    import mne

    # MNE >= 1.13 calls the same positions 'colin27_1020' and deprecates 'standard_1020'.
    name = "colin27_1020" if "colin27_1020" in mne.channels.get_builtin_montages() else "standard_1020"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ch_pos = mne.channels.make_standard_montage(name).get_positions()["ch_pos"]
    names = [n for n in ch_pos if n not in _NOT_SCALP]
    return names, np.array([ch_pos[n] for n in names], dtype=np.float64)


# The classic 19 positions of the 10-20 system come first, so small montages look familiar.
_CLASSIC = {"Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "T7", "C3", "Cz", "C4", "T8",
            "P7", "P3", "Pz", "P4", "P8", "O1", "O2"}


def _tier(name: str) -> int:
    """0: classic 10-20; 1: other 10-10 cap positions; 2: inferior 9/10 row and Iz (rare in caps)."""
    if name in _CLASSIC:
        return 0
    return 2 if name == "Iz" or name.endswith(("9", "10")) else 1


def select_channels(n: int) -> tuple[list[str], np.ndarray]:
    """``n`` well-spread channels: names and positions ``[n, 3]`` (m, MNE head frame), deterministic.

    Farthest-point sampling from Cz, first over the classic 19 10-20 positions,
    then the other 10-10 cap positions, the inferior 9/10 row last; returned in
    montage order.
    """
    names, pos = _montage_positions()
    if n > len(names):
        raise ValueError(f"sim.n_channels={n} but the standard 10-20 montage has only {len(names)} "
                         f"distinct scalp positions; use at most {len(names)} channels")
    tiers = np.array([_tier(x) for x in names])
    order = [names.index("Cz")]
    dmin = np.linalg.norm(pos - pos[order[0]], axis=1)
    for tier in range(3):
        while len(order) < n:
            cand = np.where((tiers == tier) & ~np.isin(np.arange(len(names)), order), dmin, -1.0)
            if cand.max() < 0:
                break
            j = int(np.argmax(cand))
            order.append(j)
            dmin = np.minimum(dmin, np.linalg.norm(pos - pos[j], axis=1))
    keep = sorted(order[:n])
    return [names[i] for i in keep], pos[keep]


def head_sphere() -> tuple[np.ndarray, float]:
    """Least-squares sphere through all montage scalp positions: centre ``[3]`` (m), radius (m)."""
    _, pts = _montage_positions()
    a = np.column_stack([2 * pts, np.ones(len(pts))])
    sol, *_ = np.linalg.lstsq(a, (pts ** 2).sum(axis=1), rcond=None)
    centre = sol[:3]
    return centre, float(np.sqrt(sol[3] + centre @ centre))


def lead_field(chan_pos: np.ndarray, region_pos: np.ndarray, region_ori: np.ndarray) -> np.ndarray:
    """Average-referenced dipole gain ``[C, R]`` float64.

    Scaled so that the mean over channels of ``sum_r gain[c, r]^2`` is 1: a channel
    sees unit total variance from unit-variance independent sources.
    """
    diff = chan_pos[:, None, :] - region_pos[None, :, :]          # [C, R, 3]
    r3 = np.linalg.norm(diff, axis=-1) ** 3
    gain = np.einsum("crk,rk->cr", diff, region_ori) / r3
    if len(chan_pos) > 1:                                          # one channel has no average
        gain -= gain.mean(axis=0, keepdims=True)                   # average reference
    return gain / np.sqrt((gain ** 2).sum(axis=1).mean())
