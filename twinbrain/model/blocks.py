"""STBlock: one spatio-temporal block of the TwinBrain model.

A block is self-contained so the trainer can wrap each one with activation checkpointing and FSDP2
``fully_shard``: it keeps no state between calls and draws randomness only from dropout (which
checkpointing replays). The couplings come in as tensors computed once per forward by the model (one
``C[target, source]`` per relation, shared by every block), so sharding the block never splits them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from twinbrain.model.coupling import couple, from_dense, to_dense
from twinbrain.model.layers import (CausalConv, CausalSelfAttention, FeedForward, NormLinear, SpectralNorm,
                                    dropout_add)
from twinbrain.schema import MODALITIES, RELATIONS, relation_key


def _apply_spectral_norm(module: nn.Module) -> None:
    """Spectral normalisation (:class:`SpectralNorm`) on every ``nn.Linear`` inside ``module``
    (Lipschitz control of the learned dynamics)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    for lin in linears:
        nn.utils.parametrize.register_parametrization(lin, "weight", SpectralNorm(lin.weight.detach()))


def _moved_keys() -> dict[str, tuple[str, ...]]:
    """Old key stem -> new key stems, for checkpoints written before the pre-norms moved into the layers
    after them (``layers.CausalConv``, ``layers.NormLinear``; the spatial norm of a source modality into the
    value projection of each relation it sends)."""
    moved = {}
    for m in MODALITIES:
        moved[f"norm_conv.{m}."] = (f"conv.{m}.norm_",)
        moved[f"conv.{m}.conv."] = (f"conv.{m}.",)
        moved[f"norm_attn.{m}."] = (f"attn.{m}.qkv.norm_",)
        moved[f"norm_ff.{m}."] = (f"ff.{m}.fc1.norm_",)
        moved[f"norm_space.{m}."] = tuple(f"value.{relation_key(r)}.norm_" for r in RELATIONS if r[0] == m)
    return moved


_MOVED_KEYS = _moved_keys()


def _load_moved_keys(module, state_dict, prefix, *_) -> None:
    for old, news in _MOVED_KEYS.items():
        for p in ("weight", "bias"):
            if prefix + old + p in state_dict:
                value = state_dict.pop(prefix + old + p)
                for new in news:
                    state_dict[prefix + new + p] = value


class STBlock(nn.Module):
    """Causal temporal conv -> directed coupling (per relation) -> causal temporal attention -> MLP.

    Every sub-layer is pre-LayerNorm (the norm lives in its first layer: ``CausalConv``, ``NormLinear``) with
    a residual connection (never BatchNorm: batch-1 windows).

    ``forward(h_f, h_e, couplings, idx, keep, n_windows)``:
        h_f: ``[N_f, T_f, H]`` fMRI latents (one step per TR).
        h_e: ``[N_e, L_e, H]`` EEG latents, ``L_e = T_f * steps_per_tr``.
        couplings: ``{relation_key: [M_t, M_s] or [B, M_t, M_s]}`` for every relation in ``RELATIONS``.
        idx: ``{m: [N]}`` dense slot index of every node (``window * n_slots + node_id``), or ``None``
            for nodes in slot order (:func:`twinbrain.model.coupling.in_slot_order`).
        keep: ``{m: [N, 1, 1]}`` 1 for nodes with data, 0 for masked slots (they send no message).
        n_windows: ``B``.
    Returns ``(h_f, h_e)`` with the input shapes.

    The spatial message to target ``i`` at step ``t`` is ``sum_j C[i, j] V z_j(t')`` where ``t'`` is the
    source's latest step that ends no later than ``t`` ends: the same step within a modality; the mean of
    the EEG steps inside TR ``t`` for fMRI targets; the last completed TR for EEG targets. So no block
    reads the future.
    """

    def __init__(self, hidden: int, heads: int, kernel_size: int, dropout: float, steps_per_tr: int,
                 n_slots: dict[str, int], dilation: int = 1, temporal_attention: bool = True,
                 spectral_norm: bool = False, attention_window: int = 0):
        super().__init__()
        self.steps_per_tr, self.n_slots = steps_per_tr, dict(n_slots)
        self.use_attn = temporal_attention

        def per_modality(make):
            return nn.ModuleDict({m: make() for m in MODALITIES})

        self.conv = per_modality(lambda: CausalConv(hidden, kernel_size, dilation))
        # Each relation's value projection normalises its source itself (EEG -> fMRI: then averages the EEG
        # steps inside each TR), keeping only the source stream for backward.
        self.value = nn.ModuleDict({
            relation_key(r): NormLinear(hidden, hidden, pool=steps_per_tr if (r[0], r[2]) == ("eeg", "fmri") else 1)
            for r in RELATIONS})
        if temporal_attention:
            # EEG: local causal attention over the last ``attention_window`` latent steps (linear in the
            # window length); fMRI (tens of TRs) attends to every earlier TR.
            self.attn = nn.ModuleDict({"fmri": CausalSelfAttention(hidden, heads),
                                       "eeg": CausalSelfAttention(hidden, heads, attention_window)})
        self.ff = per_modality(lambda: FeedForward(hidden))
        self.dropout = dropout
        if spectral_norm:
            _apply_spectral_norm(self)
        self.register_load_state_dict_pre_hook(_load_moved_keys)

    def check_spans(self, l_e: int, t_f: int) -> None:
        """EEG and fMRI latents must cover the same wall-clock span (``L_e = T_f * steps_per_tr``)."""
        if l_e != t_f * self.steps_per_tr:
            raise ValueError(f"EEG has {l_e} latent steps but fMRI has {t_f} TRs x {self.steps_per_tr} "
                             f"steps per TR; windows must cover the same wall-clock span")

    def last_tr_for_eeg(self, z_f: Tensor, l_e: int) -> Tensor:
        """``[N_f, T_f, H] -> [N_f, L_e, H]``: for EEG step ``j``, the fMRI latent of the last TR that has
        ended by the end of step ``j`` (TR ``(j + 1) // r - 1``; zeros before the first TR ends)."""
        padded = nn.functional.pad(z_f, (0, 0, 1, 0))                        # step 0 = "no TR yet"
        src = torch.div(torch.arange(1, l_e + 1, device=z_f.device), self.steps_per_tr, rounding_mode="floor")
        return padded.index_select(1, src)

    def spatial(self, h: dict[str, Tensor], couplings: dict[str, Tensor], idx: dict[str, Tensor],
                keep: dict[str, Tensor], n_windows: int) -> dict[str, Tensor]:
        """The spatial sub-layer: ``{m: [N_m, T_m, H]}`` -> messages ``{m: [N_m, T_m, H]}`` (fp32), one
        dense GEMM per relation over ``[B, M_s, T*H]`` (bench/spatial_operator.py times it alone).

        Every relation runs on the coarser of its two time grids: EEG -> fMRI pools the EEG latents to
        TRs before the product; fMRI -> EEG multiplies on the TR grid and only then holds each TR's
        message for the EEG steps after it (:meth:`last_tr_for_eeg`; zero before the first TR ends).
        Coupling and value projection act on the node and feature axes, the alignment on time, so the
        order changes only the cost (``steps_per_tr`` times fewer rows for fMRI -> EEG).
        """
        self.check_spans(h["eeg"].shape[1], h["fmri"].shape[1])
        msg = {m: None for m in MODALITIES}
        for rel in RELATIONS:
            src, _, dst = rel
            key = relation_key(rel)
            v = self.value[key](h[src]) * keep[src]                         # [N_s, T, H] (EEG -> fMRI: T_f)
            dense = to_dense(v, idx[src], n_windows, self.n_slots[src])    # [B, M_s, T*H]
            out = from_dense(couple(couplings[key], dense), idx[dst], tuple(v.shape[1:]))
            if (src, dst) == ("fmri", "eeg"):
                out = self.last_tr_for_eeg(out, h["eeg"].shape[1])         # [N_e, L_e, H]
            msg[dst] = out if msg[dst] is None else msg[dst] + out
        return msg

    def forward(self, h_f: Tensor, h_e: Tensor, couplings: dict[str, Tensor], idx: dict[str, Tensor],
                keep: dict[str, Tensor], n_windows: int) -> tuple[Tensor, Tensor]:
        # Dropout on the last two residual branches only (attention, MLP; the MLP alone without attention):
        # each mask is a full [N, T, H] draw, and on CPU drawing them cost as much as the attention.
        h = {"fmri": h_f, "eeg": h_e}
        for m in MODALITIES:                       # causal temporal convolution
            h[m] = h[m] + self.conv[m](h[m])

        msg = self.spatial(h, couplings, idx, keep, n_windows)
        for m in MODALITIES:
            h[m] = h[m] + msg[m].to(h[m].dtype)
            if self.use_attn:
                h[m] = dropout_add(h[m], self.attn[m](h[m]), self.dropout, self.training)
            h[m] = dropout_add(h[m], self.ff[m](h[m]), self.dropout, self.training)
        return h["fmri"], h["eeg"]
