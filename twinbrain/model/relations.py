"""One spatial layer per relation ``(src, rel, dst)``, built from ``model.spatial_layer``.

Each relation of :data:`twinbrain.schema.RELATIONS` gets its own layer, stored under
``relation_key(rel)`` in ``TwinBrain.coupling`` (so its parameters are named
``coupling.<src>__<rel>__<dst>.*`` in every checkpoint). A spatial layer is an ``nn.Module`` with

* ``forward(subject [B]) -> (C, penalty)``: ``C`` ``[M_t, M_s]`` or ``[B, M_t, M_s]`` fp32, row = target,
  column = source (the one EC convention), which every block applies to its value-projected latents;
  ``penalty`` a scalar added (times ``model.coupling_l1``) to the loss;
* ``matrix(subject=None)``: the same ``C`` without the penalty (EC, figures);
* ``n_target``, ``n_source`` and a ``penalty_weight`` buffer ``[M_t, M_s]`` (priors lower it).

A new spatial layer is one file with its class, one entry in :data:`SPATIAL_LAYERS` and one choice in
``config.CHOICES['model.spatial_layer']``.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from twinbrain.model.coupling import Coupling
from twinbrain.schema import RELATIONS, Relation, relation_key


def coupling_layer(rel: Relation, n_slots: dict[str, int], n_subjects: int, cfg) -> Coupling:
    """:class:`Coupling`: a signed directed ``C[target, source]`` plus per-subject low-rank deltas of rank
    ``model.coupling_rank``; within one modality the diagonal is held at 0."""
    src, _, dst = rel
    return Coupling(n_slots[dst], n_slots[src], n_subjects, cfg.coupling_rank, self_relation=src == dst)


# ``model.spatial_layer`` -> ``make(relation, n_slots {modality: slots}, n_subjects, model_cfg)``.
SPATIAL_LAYERS: dict[str, Callable[..., nn.Module]] = {"coupling": coupling_layer}


def build_relation_layers(cfg, n_slots: dict[str, int], n_subjects: int) -> nn.ModuleDict:
    """``{relation_key(rel): layer}`` for every relation, of the kind ``cfg.spatial_layer`` (``cfg``: the
    ``ModelConfig``), in the order of ``RELATIONS``."""
    make = SPATIAL_LAYERS.get(cfg.spatial_layer)
    if make is None:
        raise ValueError(f"model.spatial_layer '{cfg.spatial_layer}' is not one of {', '.join(SPATIAL_LAYERS)}")
    return nn.ModuleDict({relation_key(r): make(r, n_slots, n_subjects, cfg) for r in RELATIONS})
