"""Small layers of the TwinBrain model.

Conventions used throughout ``twinbrain.model``:

* node features are ``[N, T, H]`` (node, latent time step, channel); time is a tensor axis, never a loop;
* an edge set is ``edge_index [2, E]`` (row 0 = source, row 1 = destination; messages flow to the
  destination) with ``edge_weight [E]``; a weight of 0 means "no edge" (the model zeroes edges whose
  endpoint slot has no data), so masked nodes never send or receive messages;
* neighbour aggregation (softmax over neighbours, scatter-add, sparse products, eigen-decompositions)
  runs in fp32 and casts back to the input dtype, so bf16 autocast or bf16 parameters (FSDP2 mixed
  precision, DeepSpeed bf16) keep exact-enough sums and matching dtypes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_NEG = -1e30  # fp32 "minus infinity" that keeps exp() and subtraction finite


def fp32_region(t: Tensor):
    """Context that switches autocast off, so matmul-like aggregation (bmm, sparse mm) stays fp32
    (CUDA has no bf16 sparse mm, and neighbour sums lose precision in bf16)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def segment_softmax(logits: Tensor, index: Tensor, num_segments: int, valid: Tensor) -> Tensor:
    """Softmax over the entries of ``logits`` that share a destination ``index``.

    Args:
        logits: ``[E, ...]`` (e.g. ``[E, T, heads]``: one softmax per destination, time step and head).
        index: ``[E]`` destination of each edge.
        valid: ``[E]`` bool; invalid edges get weight 0 and do not enter the normaliser.
    Returns:
        ``[E, ...]`` fp32 weights; they sum to 1 over the valid edges of every destination that has one,
        and are all 0 for a destination without valid edges (no NaN).
    """
    logits = logits.float()
    shape = (num_segments,) + tuple(logits.shape[1:])
    vshape = (-1,) + (1,) * (logits.dim() - 1)
    validf = valid.view(vshape).to(logits.dtype)
    masked = logits.masked_fill(~valid.view(vshape), _NEG)
    with torch.no_grad():  # the shift only stabilises exp(); softmax is invariant to it
        idx = index.view(vshape).expand_as(masked)
        top = masked.new_full(shape, _NEG).scatter_reduce(0, idx, masked, "amax", include_self=True)
    ex = torch.exp(masked - top.index_select(0, index)) * validf
    denom = ex.new_zeros(shape).index_add_(0, index, ex)
    return ex / (denom.index_select(0, index) + 1e-16)


class CausalConv(nn.Module):
    """Causal temporal convolution per node: ``[N, T, H] -> [N, T, H]``.

    Left padding of ``(kernel - 1) * dilation`` steps: output ``t`` sees inputs ``t - (k-1)d .. t`` only.
    """

    def __init__(self, hidden: int, kernel_size: int, dilation: int = 1):
        super().__init__()
        self.pad = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(hidden, hidden, kernel_size, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(F.pad(x.transpose(1, 2), (self.pad, 0)))
        return y.transpose(1, 2)


class CausalPatchEmbed(nn.Module):
    """Causal strided patch embedding of raw samples: ``[N, T_s, C] -> [N, T_s // stride, H]``.

    Latent step ``t`` sees samples ``(t+1)*stride - patch .. (t+1)*stride - 1`` (left padding of
    ``patch - stride`` zeros), i.e. nothing after the last sample of its own stride.
    """

    def __init__(self, in_features: int, hidden: int, patch: int, stride: int):
        super().__init__()
        if stride > patch:
            raise ValueError(f"patch embedding: stride {stride} > patch {patch} would skip samples")
        self.patch, self.stride = patch, stride
        self.conv = nn.Conv1d(in_features, hidden, patch, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] % self.stride:
            raise ValueError(f"EEG window of {x.shape[1]} samples is not a multiple of model.eeg_stride="
                             f"{self.stride}; cut windows to whole latent steps")
        y = self.conv(F.pad(x.transpose(1, 2), (self.patch - self.stride, 0)))
        return y.transpose(1, 2)


class FeedForward(nn.Module):
    """Position-wise MLP ``[..., H] -> [..., H]`` (expansion 2)."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class RelationAttention(nn.Module):
    """Multi-head attention message passing for one relation, over all time steps at once.

    ``x_src [N_s, T, H]``, ``x_dst [N_d, T, H]``, ``edge_index [2, E]``, ``edge_weight [E]`` ->
    ``[N_d, T, H]``.  Per edge, time step and head the logit is ``q_dst . k_src / sqrt(d) + a_h log w``
    (so attention is proportional to ``w^a_h exp(q.k)``); the softmax runs over the edges sharing a
    destination, separately for every time step; messages are scatter-added into the destination.
    The destination size comes from ``x_dst`` (``size=(N_src, N_dst)`` in PyG terms), and there is no
    self term: cross-modal messages never change the destination's shape.  Memory is ``O(E T H)``.
    With ``E = 0`` every projection still runs (zero messages through ``out``), so all parameters
    take part in every step.
    """

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.dim = heads, hidden // heads
        self.q, self.k = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.v, self.out = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.edge_scale = nn.Parameter(torch.ones(heads))

    def forward(self, x_src: Tensor, x_dst: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        n_dst, t, hid = x_dst.shape
        src, dst = edge_index[0], edge_index[1]
        q = self.q(x_dst).float().view(n_dst, t, self.heads, self.dim)
        k = self.k(x_src).float().view(x_src.shape[0], t, self.heads, self.dim)
        v = self.v(x_src).float().view(x_src.shape[0], t, self.heads, self.dim)
        logits = (q.index_select(0, dst) * k.index_select(0, src)).sum(-1) / math.sqrt(self.dim)
        w = edge_weight.float()
        logits = logits + self.edge_scale.float() * torch.log(w.clamp_min(1e-6)).view(-1, 1, 1)
        alpha = segment_softmax(logits, dst, n_dst, w > 0)                     # [E, T, heads]
        msg = alpha.unsqueeze(-1) * v.index_select(0, src)                     # [E, T, heads, d]
        agg = msg.new_zeros(n_dst, t, self.heads, self.dim).index_add_(0, dst, msg)
        return self.out(agg.view(n_dst, t, hid).to(x_dst.dtype))


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention over time, per node: ``[N, T, H] -> [N, T, H]``."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        n, t, hid = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, hid // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)           # [N, heads, T, d]
        return self.out(y.transpose(1, 2).reshape(n, t, hid))


class SpectralNorm(nn.Module):
    """Parametrization ``W -> W / sigma_max(W)`` (one power iteration per training forward), with the
    power iteration and ``sigma`` in fp32 so bf16 parameters (FSDP2 / DeepSpeed mixed precision) and
    autocast work; torch's own ``spectral_norm`` mixes dtypes there.  ``u``, ``v`` are buffers updated
    in training forwards and cloned before use, so a checkpointed recompute does not invalidate
    tensors saved for backward (it just refines the estimate once more)."""

    def __init__(self, weight: Tensor, eps: float = 1e-12):
        super().__init__()
        self.eps = eps
        out_f, in_f = weight.shape
        self.register_buffer("_u", F.normalize(torch.randn(out_f), dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(torch.randn(in_f), dim=0, eps=eps))

    def forward(self, weight: Tensor) -> Tensor:
        with fp32_region(weight):
            w = weight.float()
            if self.training:
                with torch.no_grad():
                    v = F.normalize(w.t() @ self._u.float(), dim=0, eps=self.eps)
                    u = F.normalize(w @ v, dim=0, eps=self.eps)
                    self._v.copy_(v)
                    self._u.copy_(u)
            u, v = self._u.float().clone(), self._v.float().clone()
            sigma = torch.dot(u, w @ v)
            return (w / sigma.clamp_min(self.eps)).to(weight.dtype)


# ---------------------------------------------------------------- dense per-window slot layout
# Node identity is a fixed atlas slot, unique within a window, so ``window * n_slots + node_id`` places
# every node in a dense [B, n_slots] layout without a host sync, identically for a batch and a window.

def dense_index(node_id: Tensor, window: Tensor, n_slots: int) -> Tensor:
    """``[N]`` flat position of every node in a ``[B * n_slots]`` dense layout."""
    return window * n_slots + node_id


class DynamicAdjacency(nn.Module):
    """Learned adjacency between atlas slots from identity embeddings (Graph-WaveNet style).

    ``A[i, j] = softmax_j(relu(e1_i . e2_j))`` over the slots present (``mask``) in the same window.
    It depends on node identity only, never on the signal, so it is causal by construction; the
    per-block :class:`DynamicMessage` gates it per node and time step from features at ``t`` only.
    Returns ``[B, n_slots, n_slots]`` fp32 (row = destination).
    """

    def __init__(self, n_slots: int, dim: int = 16):
        super().__init__()
        self.n_slots = n_slots
        # Plain parameters (not nn.Embedding children) so ZeRO-3 gathers them with this module's forward.
        self.e1 = nn.Parameter(0.5 * torch.randn(n_slots, dim))
        self.e2 = nn.Parameter(0.5 * torch.randn(n_slots, dim))

    def forward(self, idx: Tensor, mask: Tensor, n_windows: int) -> Tensor:
        with fp32_region(idx):
            logits = F.relu(self.e1.float() @ self.e2.float().t())               # [M, M]
        present = torch.zeros(n_windows * self.n_slots, dtype=torch.bool, device=idx.device)
        present = present.index_put((idx,), mask).view(n_windows, 1, self.n_slots)
        eye = torch.eye(self.n_slots, dtype=torch.bool, device=idx.device)
        valid = present & ~eye                                                 # no self term
        z = logits.unsqueeze(0).masked_fill(~valid, _NEG)
        ex = torch.exp(z - z.amax(-1, keepdim=True).detach()) * valid
        return ex / (ex.sum(-1, keepdim=True) + 1e-16)


class DynamicMessage(nn.Module):
    """Messages along a learned dense adjacency, gated per node and time step.

    ``h [N, T, H]``, ``adj [B, M, M]``, ``idx [N]`` (see :func:`dense_index`) -> ``[N, T, H]``;
    message ``= sigmoid(g . h[n, t]) * sum_j A[n, j] V h[j, t]``: one batched product over ``[M, T*H]``.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.v, self.gate = nn.Linear(hidden, hidden), nn.Linear(hidden, 1)

    def forward(self, h: Tensor, adj: Tensor, idx: Tensor) -> Tensor:
        n, t, hid = h.shape
        b, m = adj.shape[0], adj.shape[1]
        v = self.v(h).float().reshape(n, t * hid)
        dense = v.new_zeros(b * m, t * hid).index_copy(0, idx, v).view(b, m, t * hid)
        with fp32_region(h):
            mixed = torch.bmm(adj.float(), dense).view(b * m, t, hid).index_select(0, idx)
        return (torch.sigmoid(self.gate(h).float()) * mixed).to(h.dtype)


class LatentPredictor(nn.Module):
    """Residual prediction of the next ``S`` latent steps from step ``t``: ``[N, L, H] -> [N, L, S, H]``
    (entry ``[n, t, s]`` stands for latent step ``t + 1 + s``; reads step ``t`` only, so causal)."""

    def __init__(self, hidden: int, steps: int):
        super().__init__()
        self.steps = steps
        self.lin = nn.Linear(hidden, steps * hidden)
        self.step_emb = nn.Parameter(torch.zeros(steps, hidden))

    def forward(self, z: Tensor) -> Tensor:
        n, l_len, hid = z.shape
        return self.lin(z).view(n, l_len, self.steps, hid) + z.unsqueeze(2) + self.step_emb


# ---------------------------------------------------------------- static graph operators

def normalized_adjacency(edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> Tensor:
    """Sparse ``[N, N]`` fp32 operator ``P[dst, src] = w / sum_{e -> dst} w`` (weighted mean over
    in-neighbours; rows without edges are 0)."""
    w = edge_weight.float()
    deg = w.new_zeros(num_nodes).index_add_(0, edge_index[1], w)
    vals = w / deg.index_select(0, edge_index[1]).clamp_min(1e-12)
    return torch.sparse_coo_tensor(edge_index.flip(0), vals, (num_nodes, num_nodes),
                                   check_invariants=False).coalesce()


class GraphPropagation(nn.Module):
    """``hops`` rounds of ``z <- z + W_k(P z)`` over a static graph (``P`` from
    :func:`normalized_adjacency`), so a change at one node reaches its ``hops``-neighbourhood.

    ``z [N, *, H]`` -> same shape; ``P z`` is one sparse product over ``[N, prod(*) * H]`` in fp32.
    Time steps are never mixed, so propagation is causal.
    """

    def __init__(self, hidden: int, hops: int):
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(hops))

    def forward(self, z: Tensor, prop: Tensor) -> Tensor:
        for lin in self.lins:
            with fp32_region(z):
                agg = torch.sparse.mm(prop, z.float().flatten(1)).view(z.shape).to(z.dtype)   # flatten: N may be 0
            z = z + lin(agg)
        return z


@torch.no_grad()
def laplacian_pe(edge_index: Tensor, edge_weight: Tensor, idx: Tensor, n_windows: int, n_slots: int,
                 k: int) -> Tensor:
    """Laplacian positional encoding per window from its (symmetrised) weighted graph: ``[N, k]`` fp32.

    Per window, ``L = I - D^-1/2 A D^-1/2`` over the slot layout; slots without edges (absent or
    isolated) get diagonal 3 so they never enter the low spectrum.  The ``k`` eigenvectors after the
    first are taken, each with a canonical sign (``sum v^3 >= 0``), which keeps the encoding
    permutation-equivariant; eigenvectors of repeated eigenvalues are not unique (rare for weighted
    graphs).  Slots beyond the available spectrum get zeros.
    """
    m = n_slots
    a = torch.zeros(n_windows * m, m, device=idx.device, dtype=torch.float32)
    win = torch.div(idx, m, rounding_mode="floor")
    src, dst = idx[edge_index[0]], idx[edge_index[1]]
    a = a.index_put_((dst, src - win[edge_index[1]] * m), edge_weight.float(), accumulate=True)
    a = a.view(n_windows, m, m)
    a = 0.5 * (a + a.transpose(1, 2))
    deg = a.sum(-1)
    dinv = torch.where(deg > 0, deg.clamp_min(1e-12).rsqrt(), torch.zeros_like(deg))
    lap = -dinv.unsqueeze(-1) * a * dinv.unsqueeze(-2)
    diag = torch.where(deg > 0, torch.ones_like(deg), torch.full_like(deg, 3.0))
    lap = lap + torch.diag_embed(diag)
    with fp32_region(lap):
        _, vecs = torch.linalg.eigh(lap)                                      # ascending eigenvalues
    vecs = vecs[..., 1:k + 1]
    sign = torch.where((vecs ** 3).sum(1, keepdim=True) >= 0, 1.0, -1.0)
    vecs = vecs * sign
    if vecs.shape[-1] < k:
        vecs = F.pad(vecs, (0, k - vecs.shape[-1]))
    return vecs.reshape(n_windows * m, k).index_select(0, idx)
