"""Facts every floor shares: the modalities, their time steps, node masks and the directed relations.

A relation is keyed ``(source, relation, target)`` exactly like a PyG ``HeteroData`` edge type, and its
learned coupling is ``C[target, source]`` (row = target, column = source), the one EC convention.
"""
from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    import torch

MODALITIES = ("fmri", "eeg")

# The loss terms that score the signal itself (reconstruction and forecast of each modality): what
# validation reports as ``loss`` and what personalisation fits. ``model.losses.KINDS`` adds the
# auxiliary ``corr`` and ``latent`` terms, which train the model but are not its score.
SIGNAL_KINDS = ("recon", "forecast")
SIGNAL_LOSS_TERMS = tuple(f"{m}_{kind}" for m in MODALITIES for kind in SIGNAL_KINDS)


def samples_per_step(model_cfg=None, *, eeg_stride: int | None = None) -> dict[str, int]:
    """Signal samples per latent (forecast) step of each modality: one fMRI volume (a TR), and
    ``model.eeg_stride`` EEG samples (``eeg_stride`` given: that stride, without a config)."""
    return {"fmri": 1, "eeg": int(model_cfg.eeg_stride if eeg_stride is None else eeg_stride)}


def node_mask(store, like: str = "y") -> torch.Tensor:
    """``[N]`` bool of a modality's node store (``batch[m]``): its ``mask`` (slots with data), or all True
    where the store has none (``N`` and the device read from ``store[like]``: ``y`` for targets, ``x``
    where only inputs are certain, as in the model's forward)."""
    if "mask" in store:
        return store.mask.bool()
    import torch        # here, so the facts above import without torch (data floor, CLI)
    ref = store[like]
    return torch.ones(ref.shape[0], dtype=torch.bool, device=ref.device)

Relation = tuple[str, str, str]

# Every directed coupling the model learns. ``fc`` couples nodes of one modality at the same step;
# ``to`` couples across modalities on the target's clock (EEG pooled per TR for fMRI targets, the last
# completed TR for EEG targets), so no relation reads the future.
RELATIONS: tuple[Relation, ...] = (
    ("fmri", "fc", "fmri"),
    ("eeg", "fc", "eeg"),
    ("eeg", "to", "fmri"),
    ("fmri", "to", "eeg"),
)


def relation_key(rel: Relation) -> str:
    """``('eeg', 'to', 'fmri') -> 'eeg__to__fmri'`` (a valid ``nn.ModuleDict`` key)."""
    return "__".join(rel)
