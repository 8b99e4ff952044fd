"""Who drives whom: learned directed couplings between node slots and the linear dynamics core.

* :class:`Coupling` — one signed matrix ``C[target, source]`` per relation over all atlas/channel
  slots, plus per-subject low-rank deltas ``U_s V_sᵀ`` (personal EC). Applied to features in the dense
  slot layout ``[B, M, T·H]`` as one batched GEMM: no per-edge or per-time-step tensors, and time is
  never mixed, so it is causal.
* :class:`LinearCore` — a VAR(p) over all slots of a modality in signal space (z-units), iterated over
  the forecast horizon exactly like the ridge-VAR baseline, so warm-started in closed form the model
  *is* the tuned VAR and the nonlinear path only adds corrections. With ``core`` = ``transfer`` / ``auto``
  it can instead be the one-TR flow of ``dx/dt = c - D x + W tanh(b x)`` (continuous-time MINDy),
  warm-started by the same L-BFGS fit as the ``svar`` baseline.

Both keep their matrices in fp32 and multiply outside autocast (tensor-core friendly on GPU in fp32/TF32,
exact sums under bf16).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from twinbrain.model.layers import fp32_region
from twinbrain.scoring.flow import transfer_flow


def in_slot_order(idx: Tensor, n_windows: int, n_slots: int) -> Tensor | None:
    """``idx`` (:func:`twinbrain.model.layers.dense_index` of every node), or ``None`` when the nodes fill
    every slot of every window in order (a full atlas or montage): the slot layout is then a view of the
    node features and :func:`to_dense` / :func:`from_dense` copy nothing."""
    n = idx.numel()
    if n == n_windows * n_slots and torch.equal(idx, torch.arange(n, device=idx.device)):
        return None
    return idx


def to_dense(h: Tensor, idx: Tensor | None, n_windows: int, n_slots: int) -> Tensor:
    """``[N, *F]`` node features -> ``[B, M, prod(F)]`` slot layout (absent slots are 0).
    ``idx`` is :func:`twinbrain.model.layers.dense_index` of every node (unique), or ``None`` for nodes in
    slot order (:func:`in_slot_order`)."""
    flat = h.flatten(1)                                            # (N may be 0: modality absent)
    if idx is None:
        return flat.view(n_windows, n_slots, flat.shape[1])
    # index_put, not index_copy: autograd's index_copy keeps the source (a full copy of the features of every
    # relation and block) for backward, index_put only the index.
    out = flat.new_zeros(n_windows * n_slots, flat.shape[1]).index_put((idx,), flat)
    return out.view(n_windows, n_slots, flat.shape[1])


def from_dense(d: Tensor, idx: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`to_dense`: ``[B, M, prod(F)] -> [N, *F]`` for the nodes at ``idx``."""
    if idx is None:
        return d.reshape(-1, *shape)
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


def _var_steps(a: Tensor, b: Tensor, s0: Tensor, steps: int) -> list[Tensor]:
    """The ``steps`` outputs ``[B, M, L]`` of ``y = a s + b; s <- [y, s[:-M]]`` (see :func:`var_rollout`)."""
    m, state, outs = a.shape[-2], s0, []
    for _ in range(steps):
        y = torch.matmul(a, state) + b
        outs.append(y)
        state = torch.cat([y, state[:, :-m]], dim=1) if state.shape[1] > m else y
    return outs


def _stack_lags(a1: Tensor, a_rest: Tensor) -> Tensor:
    """Lag 1 ``[(B,) M, M]`` and lags 2..p ``[M, (p-1) M]`` -> ``[(B,) M, p M]``."""
    if not a_rest.shape[-1]:
        return a1
    return torch.cat([a1, a_rest.expand(*a1.shape[:-2], *a_rest.shape)], dim=-1)


class _VarRolloutFn(torch.autograd.Function):
    """``steps`` iterations of ``y = A s + b; s <- [y, s[:-M]]`` from ``s0 [B, pM, L]`` -> ``[B, M, L, steps]``,
    ``A = [a1, a_rest]`` (lag 1, possibly personal; lags 2..p).

    Autograd of the loop keeps every step's ``[B, pM, L]`` state (p copies of each output), builds each state
    by concatenation and computes the coefficient gradient as ``steps`` small GEMMs. Here the outputs go into
    one time-ordered history ``[B, (p + steps) M, L]`` (``s0`` oldest first), so the state of step ``i`` is
    the contiguous slice of blocks ``i .. i + p - 1`` (multiplied by the lags in reverse order) and is never
    copied; the history is all that backward keeps. Backward is the same recursion backwards in time on the
    adjoint, ``d_i = g_i + sum_k A_kᵀ d_{i+k}`` (one ``[M, pM]`` GEMM per step over a buffer with ``p`` zero
    blocks on each side), then the gradient of each lag that needs one (a frozen ``a_rest`` does not) as
    one large GEMM over all steps."""

    @staticmethod
    def forward(ctx, a1: Tensor, a_rest: Tensor, b: Tensor, s0: Tensor, steps: int) -> Tensor:
        a = _stack_lags(a1, a_rest)                                              # [(B,) M, pM], lag-major
        n_win, pm, length = s0.shape
        m = a.shape[-2]
        order = pm // m
        a_rev = a.unflatten(-1, (order, m)).flip(-2).flatten(-2)                 # columns oldest lag first
        hist = s0.new_empty(n_win, (order + steps) * m, length)
        hist[:, :pm] = s0.view(n_win, order, m, length).flip(1).reshape(n_win, pm, length)
        for i in range(steps):
            hist[:, (order + i) * m:(order + i + 1) * m] = torch.matmul(a_rev, hist[:, i * m:(i + order) * m]).add_(b)
        ctx.save_for_backward(a, hist)
        ctx.batched_a1 = a1.dim() == 3
        return hist[:, pm:].view(n_win, steps, m, length).permute(0, 2, 3, 1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, hist = ctx.saved_tensors
        n_win, _, length = hist.shape
        m = a.shape[-2]
        order = a.shape[-1] // m
        steps = hist.shape[1] // m - order
        g = grad.permute(0, 3, 1, 2).reshape(n_win, steps * m, length)          # time-major blocks
        a_t = a.unflatten(-1, (order, m)).transpose(-1, -3).flatten(-2)          # [(B,) M, pM]: block k = A_kᵀ
        adj = g.new_empty(n_win, (2 * order + steps) * m, length)                # block p + i = d_i
        adj[:, :order * m] = 0
        adj[:, (order + steps) * m:] = 0
        for i in reversed(range(steps)):
            lo = (order + i) * m
            adj[:, lo:lo + m] = torch.matmul(a_t, adj[:, lo + m:lo + (order + 1) * m]).add_(g[:, i * m:(i + 1) * m])
        need = ctx.needs_input_grad
        grad_a1 = grad_rest = grad_b = grad_s0 = None
        d = adj[:, order * m:(order + steps) * m].view(n_win, steps, m, length)

        def lag_grad(k: int, batched: bool) -> Tensor:
            """Gradient of lag ``k``: step ``i`` saw the sample at time ``i - k`` (history block ``p + i - k``);
            one batched GEMM over the (window, step) blocks, summed over steps (no transposed copies)."""
            xk = hist[:, (order - k) * m:(order - k + steps) * m].view(n_win, steps, m, length)
            gk = torch.matmul(d, xk.transpose(-1, -2)).sum(1)
            return gk if batched else gk.sum(0)

        if need[0]:
            grad_a1 = lag_grad(1, ctx.batched_a1)
        if need[1] and order > 1:
            grad_rest = torch.cat([lag_grad(k, False) for k in range(2, order + 1)], dim=-1)
        if need[2]:
            grad_b = d.sum((0, 1, 3)).view(1, m, 1)
        if need[3]:   # s0's lag j + 1 (time -1 - j) was seen by step i through A_{i + 1 + j}
            grad_s0 = torch.cat([torch.matmul(a_t, adj[:, (order - j) * m:(2 * order - j) * m])
                                 for j in range(order)], dim=1)
        return grad_a1, grad_rest, grad_b, grad_s0, None


def var_rollout(a1: Tensor, a_rest: Tensor, b: Tensor, s0: Tensor, steps: int, fused: bool = False) -> Tensor:
    """Iterated VAR forecasts ``[B, M, L, steps]`` from ``s0 [B, p·M, L]`` (lag-major state): lag 1
    ``a1 [(B,) M, M]``, lags 2..p ``a_rest [M, (p-1)·M]``, ``b [1, M, 1]``; ``y = [a1, a_rest] s + b``, then
    ``s <- [y, s[:-M]]``. ``fused`` (training): :class:`_VarRolloutFn`, the same values with less kept and
    computed for backward; otherwise the plain loop, which forward-mode AD (the EC Jacobian) also goes
    through."""
    if fused and torch.is_grad_enabled() and s0.numel() and steps:
        return _VarRolloutFn.apply(a1, a_rest, b, s0, steps)
    return torch.stack(_var_steps(_stack_lags(a1, a_rest), b, s0, steps), dim=-1)


class LinearCore(nn.Module):
    """VAR(p) over all slots of one modality in signal space, iterated over ``steps`` future steps.

    ``x_{t+1} = b + sum_{k=1..p} A_k x_{t+1-k}``; ``coef [p, M, M]`` with ``coef[k, i, j]`` = effect of
    slot ``j`` at lag ``k + 1`` on slot ``i`` (the ridge-VAR baseline's layout), ``intercept [M]``.
    Lags before the window start repeat the window's first sample (the first ``p - 1`` steps of a window
    see a shorter past). ``stride`` > 1 (EEG: the samples of one latent step) forecasts ``steps`` samples
    from the last sample of every ``stride`` inputs only.
    Starts at persistence (``A_1 = I``) until :meth:`load_var` warm-starts it.

    Personal EC in signal space: subject ``s`` uses ``A_1 + U_s Vᵀ`` (``U [n_subjects, M, rank]`` from zero,
    ``V [M, rank]`` shared), so personalising a subject moves its own lag-1 influences.

    Transfer flow (``core`` = ``transfer`` or ``auto``; extra parameters ``w [M, M]``, ``decay [M]`` (``D``),
    ``drive [M]`` (``c``), buffers ``slope [M]`` (``b``) and ``flow`` (which core is in use, saved with the
    checkpoint)): one step is the RK4 flow over one TR (``substeps`` steps of ``1 / substeps``) of
    ``dx/dt = c - D x + W_s tanh(b ⊙ x)`` with ``W_s = W + U_s Vᵀ``; it also starts at persistence
    (``W = D = c = 0``) until :meth:`load_transfer`. ``core = 'var'`` has exactly the VAR parameters (old
    checkpoints load); ``auto`` holds both and uses the one the warm start chose.
    """

    def __init__(self, n_slots: int, order: int, steps: int, n_subjects: int = 1, rank: int = 0,
                 core: str = "var", substeps: int = 4, stride: int = 1):
        super().__init__()
        if core not in ("var", "transfer", "auto"):
            raise ValueError(f"linear core: core '{core}' is not one of var, transfer, auto (model.core)")
        m = max(n_slots, 1)
        self.n_slots, self.order, self.steps, self.rank = n_slots, order, steps, rank
        self.core, self.substeps, self.stride = core, int(substeps), int(stride)
        coef = torch.zeros(order, m, m)
        coef[0] = torch.eye(m)
        self.coef = nn.Parameter(coef)
        self.intercept = nn.Parameter(torch.zeros(m))
        if rank:
            self.u = nn.Parameter(torch.zeros(n_subjects, m, rank))
            # Small basis: Adam moves U by ~lr per step, so the step in A_1 scales with |V|; signal-space
            # lag-1 gains are O(0.1-1) and must move gently when a subject has only a few windows.
            self.v = nn.Parameter(0.1 * torch.randn(m, rank) / m ** 0.5)
        self.use_flow = core == "transfer"              # python mirror of the ``flow`` buffer (no host sync)
        if core != "var":
            self.w = nn.Parameter(torch.zeros(m, m))
            self.decay = nn.Parameter(torch.zeros(m))
            self.drive = nn.Parameter(torch.zeros(m))
            self.register_buffer("slope", torch.ones(m))
            self.register_buffer("flow", torch.tensor([self.use_flow]))   # 1-D: FSDP2-friendly
            self.register_load_state_dict_post_hook(lambda mod, _keys: mod._sync_flow())

    def _sync_flow(self) -> None:
        self.use_flow = bool(self.flow.item()) if self.core != "var" else False

    def _personal(self, base: Tensor, subject: Tensor | None) -> Tensor:
        """``base [M, M]`` plus subject deltas: ``[M, M]`` or ``[B, M, M]``."""
        if subject is None or not self.rank:
            return base
        m = self.n_slots
        u = self.u.float().index_select(0, subject)[:, :m]
        return base + torch.matmul(u, self.v.float()[:m].t())

    def matrix(self, subject: Tensor | None = None) -> Tensor:
        """The core's EC ``[M, M]`` (or ``[B, M, M]`` of ``subject``), row = target: ``W`` (+ ``U_s Vᵀ``) for
        the transfer flow, the lag-1 matrix (:meth:`lag1`) for the VAR."""
        if not self.use_flow:
            return self.lag1(subject)
        m = self.n_slots
        with fp32_region(self.w):
            return self._personal(self.w.float()[:m, :m], subject)

    def lag1(self, subject: Tensor | None = None) -> Tensor:
        """``[M, M]`` population lag-1 matrix, or ``[B, M, M]`` personal ones of ``subject [B]``."""
        m = self.n_slots
        with fp32_region(self.coef):
            return self._personal(self.coef.float()[0, :m, :m], subject)

    @torch.no_grad()
    def load_var(self, coef, intercept) -> None:
        """Copy a fitted VAR (``coef [p', M, M]`` with ``p' <= order``, ``intercept [M]``); lags beyond
        ``p'`` are set to 0."""
        coef, intercept = torch.as_tensor(coef, dtype=torch.float32), torch.as_tensor(intercept, dtype=torch.float32)
        p, m = coef.shape[0], self.n_slots
        if self.core == "transfer":
            raise ValueError("linear core: model.core is 'transfer'; warm-start it with load_transfer, not load_var")
        if p > self.order or coef.shape[1:] != (m, m) or intercept.shape != (m,):
            raise ValueError(f"linear core: VAR of shape {tuple(coef.shape)} does not fit order <= {self.order} "
                             f"over {m} slots")
        self.coef.zero_()
        self.coef[:p, :m, :m] = coef
        self.intercept.zero_()
        self.intercept[:m] = intercept
        self._set_flow(False)

    @torch.no_grad()
    def load_transfer(self, w, decay, drive, slope) -> None:
        """Copy a fitted flow (``w [M, M]``, ``decay [M]``, ``drive [M]``, ``slope [M]``:
        :class:`twinbrain.scoring.transfer.TransferFlow`'s ``w, d, c, b``) and use it."""
        if self.core == "var":
            raise ValueError("linear core: model.core is 'var'; set model.core: transfer or auto for a flow core")
        m = self.n_slots
        w = torch.as_tensor(w, dtype=torch.float32)
        if w.shape != (m, m):
            raise ValueError(f"linear core: flow W of shape {tuple(w.shape)} does not fit {m} slots")
        for dst, src in ((self.decay, decay), (self.drive, drive), (self.slope, slope)):
            dst.zero_()
            dst[:m] = torch.as_tensor(src, dtype=torch.float32)
        self.w.zero_()
        self.w[:m, :m] = w
        self._set_flow(True)

    def _set_flow(self, on: bool) -> None:
        if self.core == "auto":
            self.flow.fill_(on)
            self._sync_flow()

    def forward(self, x: Tensor, subject: Tensor | None = None) -> Tensor:
        """``x [B, M, T]`` (window ``b`` of subject ``subject[b]``) -> ``[B, M, T // stride, steps]``; entry
        ``[b, i, t, s]`` forecasts sample ``(t + 1) * stride + s`` from inputs ``< (t + 1) * stride`` only
        (iterated on its own predictions; ``stride`` = 1: from every step)."""
        m, t_len, st = self.n_slots, x.shape[-1], self.stride
        if self.use_flow:                     # order 1: each step sees only the previous (predicted) sample
            with fp32_region(x):
                w = self.matrix(subject)
                d, c, b = (p.float()[:m].view(m, 1) for p in (self.decay, self.drive, self.slope))
                y, outs = x.float()[..., st - 1::st], []
                for _ in range(self.steps):
                    y = transfer_flow(y, w, d, c, b, self.substeps)
                    outs.append(y)
            return torch.stack(outs, dim=-1)
        with fp32_region(x):
            # Lags 2..p side by side, [M, (p-1) M]: one GEMM per step over the lag-major state.
            a_rest = self.coef.float()[1:, :m, :m].permute(1, 0, 2).reshape(m, (self.order - 1) * m)
            b = self.intercept.float()[:m].view(1, m, 1)
            x = x.float()
            # Lag k + 1 of latent step t is sample (t + 1) stride - 1 - k; lags before the window start repeat
            # its first sample (a persistence guess; zeros, the mean, gave smooth BOLD a large error at the
            # first p - 1 positions of every window). Gathered at the L used positions only.
            ends = torch.arange(st - 1, t_len - t_len % st, st, device=x.device)
            pos = (ends.unsqueeze(0) - torch.arange(self.order, device=x.device).unsqueeze(1)).clamp_min(0)
            state = x.index_select(-1, pos.flatten()).unflatten(-1, pos.shape)         # [B, M, p, L]
            state = state.transpose(1, 2).flatten(1, 2)                                 # [B, p M, L]
            return var_rollout(self.lag1(subject), a_rest, b, state, self.steps, fused=self.training)
