"""Facts every floor shares: the modalities and the directed relations between them.

A relation is keyed ``(source, relation, target)`` exactly like a PyG ``HeteroData`` edge type, and its
learned coupling is ``C[target, source]`` (row = target, column = source), the one EC convention.
"""
from __future__ import annotations

MODALITIES = ("fmri", "eeg")

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
