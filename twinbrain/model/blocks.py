"""STBlock: one spatio-temporal block of the TwinBrain model.

A block is self-contained so the trainer can wrap each one with activation checkpointing and FSDP2
``fully_shard``: it takes only tensors as positional arguments, returns a tuple of tensors, keeps no
state between calls and draws randomness only from dropout (which checkpointing replays).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from twinbrain.model.layers import (CausalConv, CausalSelfAttention, DynamicMessage, FeedForward,
                                    RelationAttention, SpectralNorm)

MODALITIES = ("fmri", "eeg")


def _apply_spectral_norm(module: nn.Module) -> None:
    """Spectral normalisation (:class:`SpectralNorm`) on every ``nn.Linear`` inside ``module``
    (Lipschitz control of the learned dynamics)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    for lin in linears:
        nn.utils.parametrize.register_parametrization(lin, "weight", SpectralNorm(lin.weight.detach()))


class STBlock(nn.Module):
    """Causal temporal conv -> spatial attention (per relation) -> causal temporal attention -> MLP.

    Every sub-layer is pre-LayerNorm with a residual connection (never BatchNorm: batch-1 windows).

    Args of ``forward`` (all tensors, positional):
        h_f: ``[N_f, T_f, H]`` fMRI latents (one step per TR).
        h_e: ``[N_e, L_e, H]`` EEG latents, ``L_e = T_f * steps_per_tr``.
        ei_ff, ew_ff: ``('fmri','fc','fmri')`` edges ``[2, E]`` and weights ``[E]`` (0 = no edge).
        ei_ee, ew_ee: ``('eeg','fc','eeg')``.
        ei_ef, ew_ef: ``('eeg','to','fmri')``; src = EEG channel, dst = fMRI region.
        adj_f, idx_f, adj_e, idx_e: learned dense adjacency ``[B, M, M]`` and dense node index ``[N]``
            per modality (only with ``dynamic_adjacency``; otherwise None).
    Returns ``(h_f, h_e)`` with the input shapes.

    Causality: the convolution is left-padded and the attention is causal; spatial messages mix nodes
    at the same step only; fMRI step ``t`` receives the mean of the EEG latent steps inside TR ``t``
    (``t*r .. t*r + r - 1``, all ending at or before the end of TR ``t``).
    """

    def __init__(self, hidden: int, heads: int, kernel_size: int, dropout: float, steps_per_tr: int,
                 dilation: int = 1, temporal_attention: bool = True, dynamic_adjacency: bool = False,
                 spectral_norm: bool = False):
        super().__init__()
        self.steps_per_tr = steps_per_tr
        self.use_attn, self.use_dyn = temporal_attention, dynamic_adjacency

        def per_modality(make):
            return nn.ModuleDict({m: make() for m in MODALITIES})

        self.norm_conv = per_modality(lambda: nn.LayerNorm(hidden))
        self.conv = per_modality(lambda: CausalConv(hidden, kernel_size, dilation))
        self.norm_space = per_modality(lambda: nn.LayerNorm(hidden))
        # One attention module per relation (keys mirror the HeteroData edge types).
        self.rel = nn.ModuleDict({"fmri__fc__fmri": RelationAttention(hidden, heads),
                                  "eeg__fc__eeg": RelationAttention(hidden, heads),
                                  "eeg__to__fmri": RelationAttention(hidden, heads)})
        if dynamic_adjacency:
            self.dyn = per_modality(lambda: DynamicMessage(hidden))
        if temporal_attention:
            self.norm_attn = per_modality(lambda: nn.LayerNorm(hidden))
            self.attn = per_modality(lambda: CausalSelfAttention(hidden, heads))
        self.norm_ff = per_modality(lambda: nn.LayerNorm(hidden))
        self.ff = per_modality(lambda: FeedForward(hidden, dropout))
        self.drop = nn.Dropout(dropout)
        if spectral_norm:
            _apply_spectral_norm(self)

    def pool_eeg_to_tr(self, z_e: Tensor, t_f: int) -> Tensor:
        """``[N_e, L_e, H] -> [N_e, T_f, H]``: mean of the EEG latent steps inside each TR (causal)."""
        n, l_e, hid = z_e.shape
        if l_e != t_f * self.steps_per_tr:
            raise ValueError(f"EEG has {l_e} latent steps but fMRI has {t_f} TRs x {self.steps_per_tr} "
                             f"steps per TR; windows must cover the same wall-clock span")
        return z_e.view(n, t_f, self.steps_per_tr, hid).mean(2)

    def forward(self, h_f: Tensor, h_e: Tensor, ei_ff: Tensor, ew_ff: Tensor, ei_ee: Tensor,
                ew_ee: Tensor, ei_ef: Tensor, ew_ef: Tensor, adj_f: Tensor | None = None,
                idx_f: Tensor | None = None, adj_e: Tensor | None = None,
                idx_e: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = {"fmri": h_f, "eeg": h_e}
        for m in MODALITIES:                       # causal temporal convolution
            h[m] = h[m] + self.drop(torch.nn.functional.gelu(self.conv[m](self.norm_conv[m](h[m]))))

        z = {m: self.norm_space[m](h[m]) for m in MODALITIES}
        msg_f = self.rel["fmri__fc__fmri"](z["fmri"], z["fmri"], ei_ff, ew_ff)
        msg_f = msg_f + self.rel["eeg__to__fmri"](self.pool_eeg_to_tr(z["eeg"], h_f.shape[1]),
                                                  z["fmri"], ei_ef, ew_ef)
        msg_e = self.rel["eeg__fc__eeg"](z["eeg"], z["eeg"], ei_ee, ew_ee)
        if self.use_dyn:
            msg_f = msg_f + self.dyn["fmri"](z["fmri"], adj_f, idx_f)
            msg_e = msg_e + self.dyn["eeg"](z["eeg"], adj_e, idx_e)
        h["fmri"] = h["fmri"] + self.drop(msg_f)
        h["eeg"] = h["eeg"] + self.drop(msg_e)

        for m in MODALITIES:
            if self.use_attn:
                h[m] = h[m] + self.drop(self.attn[m](self.norm_attn[m](h[m])))
            h[m] = h[m] + self.drop(self.ff[m](self.norm_ff[m](h[m])))
        return h["fmri"], h["eeg"]
