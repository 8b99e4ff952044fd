"""The one-step map of continuous-time MINDy, ``dx/dt = c - D x + W tanh(b ⊙ x)`` integrated over one
step by RK4 — shared by its fit (:class:`twinbrain.scoring.transfer.TransferFlow`) and the twin's core
(:class:`twinbrain.model.coupling.LinearCore`), so both iterate exactly the same map."""
from __future__ import annotations

from torch import Tensor


def transfer_flow(x: Tensor, w: Tensor, d: Tensor, c: Tensor, b: Tensor, substeps: int) -> Tensor:
    """``x [..., M, T]`` (slots on dim -2) one step later, ``substeps`` RK4 steps of ``1/substeps``;
    ``w [M, M]`` or ``[B, M, M]`` (row = target), ``d, c, b [M, 1]`` (decay, drive, transfer slope)."""
    h = 1.0 / substeps

    def f(v: Tensor) -> Tensor:
        return c - d * v + w @ (b * v).tanh()

    for _ in range(substeps):
        k1 = f(x)
        k2 = f(x + h / 2 * k1)
        k3 = f(x + h / 2 * k2)
        k4 = f(x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x
