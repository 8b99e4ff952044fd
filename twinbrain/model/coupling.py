"""Who drives whom: learned directed couplings between node slots and the linear dynamics core.

* :class:`Coupling` — one signed matrix ``C[target, source]`` per relation over all atlas/channel
  slots, plus per-subject low-rank deltas ``U_s V_sᵀ`` (personal EC). Applied to features in the dense
  slot layout ``[B, M, T·H]`` as one batched GEMM: no per-edge or per-time-step tensors, and time is
  never mixed, so it is causal.
* :class:`LinearCore` — a VAR(p) over all slots of a modality in signal space (z-units), iterated over
  the forecast horizon exactly like the ridge-VAR baseline, so warm-started in closed form the model
  *is* the tuned VAR and the nonlinear path only adds corrections.

Both keep their matrices in fp32 and multiply outside autocast (tensor-core friendly on GPU in fp32/TF32,
exact sums under bf16).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from twinbrain.model.layers import fp32_region


def to_dense(h: Tensor, idx: Tensor, n_windows: int, n_slots: int) -> Tensor:
    """``[N, *F]`` node features -> ``[B, M, prod(F)]`` slot layout (absent slots are 0).
    ``idx`` is :func:`twinbrain.model.layers.dense_index` of every node."""
    flat = h.flatten(1)                                            # (N may be 0: modality absent)
    out = flat.new_zeros(n_windows * n_slots, flat.shape[1]).index_copy(0, idx, flat)
    return out.view(n_windows, n_slots, flat.shape[1])


def from_dense(d: Tensor, idx: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`to_dense`: ``[B, M, prod(F)] -> [N, *F]`` for the nodes at ``idx``."""
    return d.flatten(0, 1).index_select(0, idx).view(idx.shape[0], *shape)


class Coupling(nn.Module):
    """Signed directed coupling ``C[target, source]`` of one relation, shared by every block.

    ``forward(subject [B]) -> (C_s [B, M_t, M_s], penalty)`` fp32: ``C + U_s Vᵀ`` per window (``rank`` = 0:
    ``C`` only, broadcast) and the prior-weighted sparsity term ``mean(|C| * penalty_weight)``. The penalty is
    computed here, inside ``forward``, because ZeRO-3 only gathers a module's parameters while it runs. ``V [M_s, rank]`` is a source basis shared by all subjects and ``U_s [M_t, rank]`` the
    subject's loadings; ``U`` starts at zero, so every subject (also one added later) starts at the
    population coupling, and its delta still gets a gradient through the shared ``V``. Within one
    modality the diagonal is held at 0 (a node's own dynamics live in its temporal path and in the
    linear core).

    Args:
        n_target, n_source: slot counts (0 = modality absent; a 1-slot parameter keeps FSDP2 happy).
        n_subjects: rows of the personal deltas. rank: their rank (0 = none).
        self_relation: zero the diagonal. init_std: scale of the initial ``C`` (times 1/sqrt(M_s)).
    """

    def __init__(self, n_target: int, n_source: int, n_subjects: int, rank: int, self_relation: bool,
                 init_std: float = 0.1):
        super().__init__()
        self.n_target, self.n_source, self.rank = n_target, n_source, rank
        rt, rs = max(n_target, 1), max(n_source, 1)
        self.weight = nn.Parameter(torch.randn(rt, rs) * init_std / rs ** 0.5)
        if rank:
            self.u = nn.Parameter(torch.zeros(n_subjects, rt, rank))
            self.v = nn.Parameter(torch.randn(rs, rank) / rs ** 0.5)
        keep = torch.ones(rt, rs)
        if self_relation:
            keep.fill_diagonal_(0.0)
        self.register_buffer("keep", keep, persistent=False)
        # Sparsity-penalty weight per entry (1 = full penalty); a prior lowers it (TwinBrain.set_prior).
        self.register_buffer("penalty_weight", torch.ones(rt, rs))

    def matrix(self, subject: Tensor | None = None) -> Tensor:
        """``[M_t, M_s]`` population coupling, or ``[B, M_t, M_s]`` personal couplings of ``subject``."""
        with fp32_region(self.weight):
            c = (self.weight.float() * self.keep)[:self.n_target, :self.n_source]
            if subject is None or not self.rank:
                return c
            u = self.u.float().index_select(0, subject)[:, :self.n_target]
            v = self.v.float()[:self.n_source]
            return c + torch.matmul(u, v.t()) * self.keep[:self.n_target, :self.n_source]

    def forward(self, subject: Tensor) -> tuple[Tensor, Tensor]:
        with fp32_region(self.weight):
            penalty = (self.weight.float().abs() * self.keep * self.penalty_weight).mean()
        return self.matrix(subject if self.rank else None), penalty


def couple(c: Tensor, x: Tensor) -> Tensor:
    """``c [M_t, M_s]`` or ``[B, M_t, M_s]`` times ``x [B, M_s, F]`` -> ``[B, M_t, F]`` in fp32."""
    with fp32_region(x):
        return torch.matmul(c, x.float())


class LinearCore(nn.Module):
    """VAR(p) over all slots of one modality in signal space, iterated over ``steps`` future steps.

    ``x_{t+1} = b + sum_{k=1..p} A_k x_{t+1-k}``; ``coef [p, M, M]`` with ``coef[k, i, j]`` = effect of
    slot ``j`` at lag ``k + 1`` on slot ``i`` (the ridge-VAR baseline's layout), ``intercept [M]``.
    Lags before the window start repeat the window's first sample (the first ``p - 1`` steps of a window
    see a shorter past).
    Starts at persistence (``A_1 = I``) until :meth:`load_var` warm-starts it.

    Personal EC in signal space: subject ``s`` uses ``A_1 + U_s Vᵀ`` (``U [n_subjects, M, rank]`` from zero,
    ``V [M, rank]`` shared), so personalising a subject moves its own lag-1 influences.
    """

    def __init__(self, n_slots: int, order: int, steps: int, n_subjects: int = 1, rank: int = 0):
        super().__init__()
        m = max(n_slots, 1)
        self.n_slots, self.order, self.steps, self.rank = n_slots, order, steps, rank
        coef = torch.zeros(order, m, m)
        coef[0] = torch.eye(m)
        self.coef = nn.Parameter(coef)
        self.intercept = nn.Parameter(torch.zeros(m))
        if rank:
            self.u = nn.Parameter(torch.zeros(n_subjects, m, rank))
            # Small basis: Adam moves U by ~lr per step, so the step in A_1 scales with |V|; signal-space
            # lag-1 gains are O(0.1-1) and must move gently when a subject has only a few windows.
            self.v = nn.Parameter(0.1 * torch.randn(m, rank) / m ** 0.5)

    def lag1(self, subject: Tensor | None = None) -> Tensor:
        """``[M, M]`` population lag-1 matrix, or ``[B, M, M]`` personal ones of ``subject [B]``."""
        m = self.n_slots
        with fp32_region(self.coef):
            a = self.coef.float()[0, :m, :m]
            if subject is None or not self.rank:
                return a
            u = self.u.float().index_select(0, subject)[:, :m]
            return a + torch.matmul(u, self.v.float()[:m].t())

    @torch.no_grad()
    def load_var(self, coef, intercept) -> None:
        """Copy a fitted VAR (``coef [p', M, M]`` with ``p' <= order``, ``intercept [M]``); lags beyond
        ``p'`` are set to 0."""
        coef, intercept = torch.as_tensor(coef, dtype=torch.float32), torch.as_tensor(intercept, dtype=torch.float32)
        p, m = coef.shape[0], self.n_slots
        if p > self.order or coef.shape[1:] != (m, m) or intercept.shape != (m,):
            raise ValueError(f"linear core: VAR of shape {tuple(coef.shape)} does not fit order <= {self.order} "
                             f"over {m} slots")
        self.coef.zero_()
        self.coef[:p, :m, :m] = coef
        self.intercept.zero_()
        self.intercept[:m] = intercept

    def forward(self, x: Tensor, subject: Tensor | None = None) -> Tensor:
        """``x [B, M, T]`` (window ``b`` of subject ``subject[b]``) -> ``[B, M, T, steps]``; entry
        ``[b, i, t, s]`` forecasts step ``t + 1 + s`` from inputs at steps ``<= t`` only (iterated on its
        own predictions)."""
        m, t_len = self.n_slots, x.shape[-1]
        with fp32_region(x):
            a = [self.lag1(subject)] + [self.coef.float()[k, :m, :m] for k in range(1, self.order)]
            b = self.intercept.float()[:m].view(1, m, 1)
            x = x.float()
            # Lags before the window start repeat its first sample (a persistence guess; zeros, the mean,
            # gave smooth BOLD a large error at the first p - 1 positions of every window).
            lags = [x] + [nn.functional.pad(x, (k, 0), mode="replicate")[..., :t_len] if t_len else x
                          for k in range(1, self.order)]
            outs = []
            for _ in range(self.steps):
                y = b + sum(torch.matmul(a[k], lags[k]) for k in range(self.order))
                outs.append(y)
                lags = [y] + lags[:-1]
        return torch.stack(outs, dim=-1)
