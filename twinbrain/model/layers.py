"""Small layers of the TwinBrain model.

Conventions used throughout ``twinbrain.model``:

* node features are ``[N, T, H]`` (node, latent time step, channel); time is a tensor axis, never a loop;
* an edge set is ``edge_index [2, E]`` (row 0 = source, row 1 = destination; messages flow to the
  destination) with ``edge_weight [E]``; a weight of 0 means "no edge" (the model zeroes edges whose
  endpoint slot has no data), so masked nodes never send or receive messages;
* aggregation over nodes (the couplings in ``coupling.py``, eigen-decompositions) runs in fp32 and casts
  back to the input dtype, so bf16 autocast or bf16 parameters (FSDP2 mixed precision, DeepSpeed bf16)
  keep exact-enough sums and matching dtypes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint



def fp32_region(t: Tensor):
    """Context that switches autocast off, so matmul-like aggregation (bmm, sparse mm) stays fp32
    (CUDA has no bf16 sparse mm, and neighbour sums lose precision in bf16)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


class ScaledSum(nn.Module):
    """``base + w * x`` with one learned scalar ``w`` (1-D: FSDP2 cannot shard a 0-d parameter).

    A module, not a bare parameter of the parent, because ZeRO-3 re-gathers a parameter for backward only
    through the hooks of the module that owns it, and those need tensor outputs.
    """

    def __init__(self, init: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((1,), float(init)))
        self.closed = False          # weight fixed at 0 (see close): the caller need not compute ``x``

    def forward(self, base: Tensor, x: Tensor) -> Tensor:
        return base + self.weight.to(x.dtype) * x

    @torch.no_grad()
    def close(self) -> None:
        """Fix the weight at 0 and stop its gradient: ``base + 0 * x`` is ``base``, so whoever feeds ``x``
        may skip computing it (and its backward). Refused for a non-zero weight, whose ``x`` matters."""
        if bool(self.weight.ne(0).any()):
            raise ValueError(f"cannot close a gate of weight {self.weight.tolist()}: only a gate at 0 adds nothing")
        self.weight.requires_grad_(False)
        self.closed = True


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last axis: ``(y, mean, rstd)`` (the statistics its backward needs)."""
    return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _layer_norm_backward(grad_y: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor,
                         needs) -> tuple:
    """Gradients of :func:`_layer_norm` w.r.t. ``(x, weight, bias)`` where ``needs`` says so (else None)."""
    return torch.ops.aten.native_layer_norm_backward(grad_y, x, (x.shape[-1],), mean, rstd, weight, bias, list(needs))


def _add_norm_parameters(module: nn.Module, features: int) -> None:
    """A pre-norm's affine parameters ``norm_weight``, ``norm_bias`` on the layer that applies it, so ZeRO-3
    gathers them with that layer's own weight."""
    module.norm_weight = nn.Parameter(torch.ones(features))
    module.norm_bias = nn.Parameter(torch.zeros(features))


class _NormConvGeluFn(torch.autograd.Function):
    """``gelu(conv1d(left_pad(layer_norm(x))))`` over time, ``[N, T, H] -> [N, T, H]`` (contiguous), saving
    ``x``, the norm's row statistics and the conv's output only; the normalised, padded input the weight
    gradient needs is recomputed in backward (``nn.LayerNorm`` keeps ``x`` and ``nn.Conv1d`` its padded copy
    of the norm's output). ``gelu`` runs on the conv's own ``[N, H, T]`` layout: on the transposed view its
    backward took 7-8x longer on CPU."""

    @staticmethod
    def forward(ctx, x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, bias: Tensor,
                eps: float, pad: int, dilation: int) -> Tensor:
        y, mean, rstd = _layer_norm(x, norm_weight, norm_bias, eps)
        pre = F.conv1d(F.pad(y.transpose(1, 2), (pad, 0)), weight, bias, dilation=dilation)    # [N, H, T]
        ctx.eps, ctx.pad, ctx.dilation = eps, pad, dilation
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight, bias, pre)
        return F.gelu(pre).transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, mean, rstd, norm_weight, norm_bias, weight, bias, pre = ctx.saved_tensors
        need_x, need_nw, need_nb, need_w, need_b = ctx.needs_input_grad[:5]
        need_in = need_x or need_nw or need_nb
        grad_pre = torch.ops.aten.gelu_backward(grad.transpose(1, 2).contiguous().to(pre.dtype), pre)
        y = _layer_norm(x, norm_weight, norm_bias, ctx.eps)[0]
        padded = F.pad(y.transpose(1, 2), (ctx.pad, 0)).to(pre.dtype)
        grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_pre, padded, weight.to(pre.dtype), None if bias is None else [bias.shape[0]],
            [1], [0], [ctx.dilation], False, [0], 1, [need_in, need_w, need_b and bias is not None])
        grads = (None, None, None)
        if need_in:
            grad_y = grad_in[..., ctx.pad:].transpose(1, 2).to(x.dtype)
            grads = _layer_norm_backward(grad_y, x, mean, rstd, norm_weight, norm_bias, (need_x, need_nw, need_nb))
        return (*grads, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


class CausalConv(nn.Conv1d):
    """Pre-LayerNorm causal temporal convolution with GELU per node: ``[N, T, H] -> [N, T, H]``, i.e.
    ``gelu(conv(layer_norm(x)))``.

    Left padding of ``(kernel - 1) * dilation`` steps: output ``t`` sees inputs ``t - (k-1)d .. t`` only.
    The norm's affine parameters (``norm_weight``, ``norm_bias``) belong to this module, so ZeRO-3 gathers
    them with the kernel; in training only the input, the norm's statistics and the conv's output are kept
    for backward (:class:`_NormConvGeluFn`).
    """

    def __init__(self, hidden: int, kernel_size: int, dilation: int = 1, eps: float = 1e-5):
        super().__init__(hidden, hidden, kernel_size, dilation=dilation)
        self.pad, self.eps = (kernel_size - 1) * dilation, eps
        _add_norm_parameters(self, hidden)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            return _NormConvGeluFn.apply(x, self.norm_weight, self.norm_bias, self.weight, self.bias, self.eps,
                                         self.pad, self.dilation[0])
        y = F.layer_norm(x, (x.shape[-1],), self.norm_weight, self.norm_bias, self.eps)
        pre = F.conv1d(F.pad(y.transpose(1, 2), (self.pad, 0)), self.weight, self.bias, dilation=self.dilation)
        return F.gelu(pre).transpose(1, 2)


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


class _GeluLinearFn(torch.autograd.Function):
    """``linear(gelu(a), weight, bias)`` that saves ``a`` only and recomputes ``gelu(a)`` in backward (an
    ``nn.Linear`` after ``F.gelu`` keeps both, each ``2H`` wide: the largest saved tensors of a block)."""

    @staticmethod
    def forward(ctx, a: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(a, weight, bias)
        return F.linear(F.gelu(a), weight, bias)          # autocast, if on, casts here as for nn.Linear

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, weight, bias = ctx.saved_tensors
        u = F.gelu(a).to(grad.dtype)
        g2, u2 = grad.reshape(-1, grad.shape[-1]), u.reshape(-1, u.shape[-1])
        grad_w = (g2.t() @ u2).to(weight.dtype)
        grad_b = None if bias is None else g2.sum(0).to(bias.dtype)
        grad_u = (grad @ weight.to(grad.dtype)).to(a.dtype)
        return torch.ops.aten.gelu_backward(grad_u, a), grad_w, grad_b


class GeluLinear(nn.Linear):
    """``nn.Linear`` applied to ``gelu(input)``; in training it saves only the pre-activation (see
    :class:`_GeluLinearFn`). A module, so ZeRO-3 gathers its weight, spectral norm can parametrize it and
    the state-dict keys stay those of ``nn.Linear``. Eval (and forward-mode AD in the twin's Jacobian EC)
    takes the plain composition."""

    def forward(self, a: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            return _GeluLinearFn.apply(a, self.weight, self.bias)
        return F.linear(F.gelu(a), self.weight, self.bias)


def _pool_steps(y: Tensor, pool: int) -> Tensor:
    """``[N, T, H] -> [N, T / pool, H]``: mean of each run of ``pool`` steps (identity for 1)."""
    return y if pool == 1 else y.view(y.shape[0], y.shape[1] // pool, pool, y.shape[2]).mean(2)


class _NormLinearFn(torch.autograd.Function):
    """``linear(pool(layer_norm(x)), weight, bias)`` that saves ``x`` and its row statistics only and
    recomputes the normalised input in backward (``nn.LayerNorm`` keeps ``x`` and the ``nn.Linear`` after
    it keeps the norm's output too: two copies of the residual stream per sub-layer)."""

    @staticmethod
    def forward(ctx, x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, bias: Tensor,
                eps: float, pool: int) -> Tensor:
        y, mean, rstd = _layer_norm(x, norm_weight, norm_bias, eps)
        ctx.eps, ctx.pool = eps, pool
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight, bias)
        return F.linear(_pool_steps(y, pool), weight, bias)    # autocast, if on, casts here as for nn.Linear

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, mean, rstd, norm_weight, norm_bias, weight, bias = ctx.saved_tensors
        need_x, need_nw, need_nb = ctx.needs_input_grad[:3]
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_w = grad_b = None
        if ctx.needs_input_grad[3]:
            y = _pool_steps(_layer_norm(x, norm_weight, norm_bias, ctx.eps)[0], ctx.pool)
            grad_w = (g2.t() @ y.reshape(-1, y.shape[-1]).to(grad.dtype)).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[4]:
            grad_b = g2.sum(0).to(bias.dtype)
        grads = (None, None, None)
        if need_x or need_nw or need_nb:
            grad_y = (grad @ weight.to(grad.dtype)).to(x.dtype)
            if ctx.pool > 1:                                   # d mean / d step = 1 / pool
                grad_y = (grad_y / ctx.pool).repeat_interleave(ctx.pool, dim=1)
            grads = _layer_norm_backward(grad_y, x, mean, rstd, norm_weight, norm_bias, (need_x, need_nw, need_nb))
        return *grads, grad_w, grad_b, None, None


class NormLinear(nn.Linear):
    """``nn.Linear`` applied to ``LayerNorm(input)`` (a sub-layer's pre-norm and its first projection),
    optionally after averaging each run of ``pool`` time steps of ``[N, T, H]`` (the EEG -> fMRI values: the
    EEG steps inside each TR). In training it saves only the input and the norm's statistics (see
    :class:`_NormLinearFn`). The norm's affine parameters, ``norm_weight`` and ``norm_bias``, belong to this
    module so ZeRO-3 gathers them with the projection; eval (and forward-mode AD in the twin's Jacobian EC)
    takes the plain composition."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps: float = 1e-5,
                 pool: int = 1):
        super().__init__(in_features, out_features, bias)
        self.eps, self.pool = eps, pool
        _add_norm_parameters(self, in_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.pool > 1 and x.shape[1] % self.pool:
            raise ValueError(f"NormLinear: {x.shape[1]} steps do not pool in runs of {self.pool}")
        if self.training and torch.is_grad_enabled():
            return _NormLinearFn.apply(x, self.norm_weight, self.norm_bias, self.weight, self.bias, self.eps,
                                       self.pool)
        y = F.layer_norm(x, (x.shape[-1],), self.norm_weight, self.norm_bias, self.eps)
        return F.linear(_pool_steps(y, self.pool), self.weight, self.bias)


class FeedForward(nn.Module):
    """Pre-LayerNorm position-wise MLP ``[..., H] -> [..., H]`` (expansion 2; the norm is ``fc1``'s, see
    :class:`NormLinear`).  No dropout inside: the block drops the residual branch it feeds (one mask of
    ``[N, T, H]`` instead of two, the inner one twice as wide)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = NormLinear(hidden, 2 * hidden), GeluLinear(2 * hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x))


def keep_mask(shape: tuple[int, ...], p: float, device) -> tuple[Tensor, float]:
    """Bool dropout mask of ``shape`` and its keep probability: ``P(keep) = 1 - p'`` with ``p'`` = ``p`` rounded
    to a multiple of 2^-16 (below 1). Each 64-bit random draw gives four 16-bit lanes, a quarter of the draws
    ``torch.rand`` makes (2.5x faster on CPU); a checkpointed recompute replays it from the restored RNG state."""
    n, drop = math.prod(shape), min(round(p * 65536), 65535)
    lanes = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(-2 ** 63, None).view(torch.int16)
    return lanes[:n].view(shape) >= drop - 32768, 1.0 - drop / 65536


class _DropoutAddFn(torch.autograd.Function):
    """``base + x * keep / P(keep)`` with ``keep`` from :func:`keep_mask`, saved as bool (a quarter of the
    float mask ``F.dropout`` keeps on CPU)."""

    @staticmethod
    def forward(ctx, base: Tensor, x: Tensor, p: float) -> Tensor:
        keep, kept = keep_mask(tuple(x.shape), p, x.device)
        ctx.scale, ctx.dtypes = 1.0 / kept, (base.dtype, x.dtype)
        ctx.save_for_backward(keep)
        return torch.addcmul(base, x, keep, value=ctx.scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        keep, = ctx.saved_tensors
        base_dtype, x_dtype = ctx.dtypes
        return grad.to(base_dtype), (grad * keep * ctx.scale).to(x_dtype), None


def dropout_add(base: Tensor, x: Tensor, p: float, training: bool) -> Tensor:
    """Residual ``base + dropout(x)`` (inverted dropout with probability ``p``, to 2^-16, while ``training``)."""
    if not training or p == 0.0:
        return base + x
    return _DropoutAddFn.apply(base, x, p)


def local_causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Sliding-window causal attention: query ``t`` attends to keys ``t - window + 1 .. t`` only.

    ``q, k, v [B, heads, T, d] -> [B, heads, T, d]``.  Time is cut into chunks of ``window`` steps; a chunk's
    queries see their own chunk and the one before (``2 * window`` keys, masked to the exact window), so the
    cost is ``O(T * window)`` instead of ``O(T^2)``.  Equal to full causal attention when ``T <= window``.
    """
    b, heads, t, d = q.shape
    c = -(-t // window)                                                        # chunks
    pad = c * window - t                                                       # right padding: only ever a
    if pad:                                                                    # key after every real query
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qc = q.reshape(b, heads, c, window, d)
    kc, vc = k.reshape(b, heads, c, window, d), v.reshape(b, heads, c, window, d)
    k2 = torch.cat([F.pad(kc, (0, 0, 0, 0, 1, 0))[:, :, :c], kc], 3)          # [B, heads, c, 2w, d]
    v2 = torch.cat([F.pad(vc, (0, 0, 0, 0, 1, 0))[:, :, :c], vc], 3)
    i = torch.arange(window, device=q.device).view(-1, 1)
    j = torch.arange(2 * window, device=q.device).view(1, -1)
    allowed = (j > i) & (j <= i + window)                                      # key j of [prev, own] chunk
    mask = allowed.expand(c, window, 2 * window).clone()
    mask[0] &= j >= window                                                     # chunk 0 has no previous one
    # A 4-D mask (expanded, not copied): with a 3-D one CPU SDPA takes its slower math path.
    mask = mask.repeat(heads, 1, 1).expand(b, -1, -1, -1)
    y = F.scaled_dot_product_attention(qc.reshape(b, heads * c, window, d), k2.reshape(b, heads * c, 2 * window, d),
                                       v2.reshape(b, heads * c, 2 * window, d), attn_mask=mask)
    return y.view(b, heads, c * window, d)[:, :, :t]


def causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int = 0) -> Tensor:
    """Causal attention over time, ``q, k, v [B, heads, T, d] -> [B, heads, T, d]``: over the last ``window``
    steps (:func:`local_causal_attention`) when ``0 < window < T``, else over every earlier step. bf16 on CPU
    runs in fp32 and casts back: there the bf16 flash-attention backward took 6-8x the fp32 one."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with fp32_region(q):
            return causal_attention(q.float(), k.float(), v.float(), window).to(q.dtype)
    if window and q.shape[2] > window:
        return local_causal_attention(q, k, v, window)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class CausalSelfAttention(nn.Module):
    """Pre-LayerNorm causal multi-head self-attention over time, per node: ``[N, T, H] -> [N, T, H]`` (the
    norm is the ``qkv`` projection's, see :class:`NormLinear`).

    ``window`` > 0: each step attends to its last ``window`` steps only (itself included;
    :func:`local_causal_attention`, linear in ``T``); 0: to every earlier step.
    """

    def __init__(self, hidden: int, heads: int, window: int = 0):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv, self.out = NormLinear(hidden, 3 * hidden), nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        n, t, hid = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, hid // self.heads).permute(2, 0, 3, 1, 4)
        if self.window and t > self.window and self.training and torch.is_grad_enabled():
            # Recomputed in backward: it would keep its padded queries and the 2x key/value chunk copies; the
            # checkpoint keeps q, k, v, views of the projection's output.
            y = checkpoint(causal_attention, q, k, v, self.window, use_reentrant=False)
        else:
            y = causal_attention(q, k, v, self.window)                        # [N, heads, T, d]
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
