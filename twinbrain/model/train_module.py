"""The trainable step module: model + loss + balancer in one ``forward``, built by one function.

Putting the loss and the balancer inside the wrapped module means DDP averages the balancer's
gradients like any other, FSDP2/ZeRO-3 gather its parameters during forward, and every parameter
is used on every step on every rank.

:func:`build_train_module` is the one assembly of a train step: the Trainer (and its FLOP probe, a copy
of the trainer's module), the benchmarks and few-shot personalisation all call it.
"""
from __future__ import annotations

from torch import nn

from twinbrain.model.balancer import LossBalancer, make_balancer
from twinbrain.model.losses import loss_counts, loss_term_names, loss_terms, normalise, term_weight
from twinbrain.schema import MODALITIES, SIGNAL_LOSS_TERMS

# ``train``: every loss term under ``train.balancer``, plus the balancer's regulariser and the coupling
# sparsity penalty (what the Trainer minimises). ``signal``: the signal terms (SIGNAL_LOSS_TERMS) at
# their fixed prior weights, nothing else (what personalisation fits).
OBJECTIVES = ("train", "signal")


class TrainModule(nn.Module):
    """``forward(batch, global_counts, data_scale, reg_scale) -> (loss, parts)``; without
    ``global_counts`` it returns the model output (evaluation).

    ``parts[term]`` is this micro-batch's share of the global mean of that term
    (``sum / global_count``); summed over micro-batches and ranks it is the global mean.
    The returned loss is ``data_scale * sum_i w_i parts_i + reg_scale * (R + P)`` where ``R`` is the
    balancer's regulariser (uncertainty weighting's ``sum_i s_i``) and ``P`` the model's coupling
    sparsity penalty, so that the gradients averaged by the backend over ranks and summed over
    micro-batches equal those of one big batch. With ``penalties=False`` the loss is
    ``data_scale * sum_i w_i parts_i`` alone.
    """

    def __init__(self, model: nn.Module, balancer: nn.Module, train_cfg, model_cfg, penalties: bool = True):
        super().__init__()
        self.model = model
        self.balancer = balancer
        self.train_cfg, self.model_cfg = train_cfg, model_cfg
        self.penalties = penalties

    def counts(self, batch) -> dict[str, float]:
        """Element counts of every loss term of this batch alone: the ``global_counts`` of a step of one
        batch on one process (no forward pass)."""
        return {k: float(v) for k, v in loss_counts(batch, self.train_cfg, self.model_cfg).items()}

    def forward(self, batch, global_counts: dict[str, float] | None = None, data_scale: float = 1.0,
                reg_scale: float = 1.0):
        out = self.model(batch)
        if global_counts is None:
            # Inference through the wrapper (FSDP2 must enter at its root to gather root parameters).
            return out
        terms = loss_terms(batch, out, self.train_cfg, self.model_cfg)
        parts = normalise(terms, global_counts)
        loss = data_scale * self.balancer.weighted(parts)
        if self.penalties:
            # The regulariser is counted once per optimizer step, not once per micro-batch and rank.
            loss = loss + reg_scale * (self.balancer.regularizer() + out.penalty)
        if getattr(self.balancer, "mode", "") == "gradnorm":
            shared = self.model.shared_parameter()
            loss = loss + reg_scale * self.balancer.gradnorm_loss(parts, shared)
        return loss, {k: v.detach() for k, v in parts.items()}


def build_train_module(model: nn.Module, train_cfg, model_cfg, modalities: tuple[str, ...] = MODALITIES,
                       objective: str = "train") -> TrainModule:
    """The train step module around ``model`` (built by ``build_model``; activation checkpointing, if
    any, may be applied to ``model.blocks`` before or after).

    ``objective``: ``train`` (the balancer of ``train.balancer`` over the loss terms of ``modalities``,
    its regulariser and the coupling penalty) or ``signal`` (fixed prior weights over the signal terms,
    no regulariser, no penalty: few-shot personalisation). Build it BEFORE the optimizer and give the
    optimizer ``module.balancer``'s parameters too (a balancer created after it is never trained).
    """
    if objective == "train":
        return TrainModule(model, make_balancer(train_cfg, loss_term_names(modalities)), train_cfg, model_cfg)
    if objective == "signal":
        weights = {k: term_weight(k, train_cfg) for k in SIGNAL_LOSS_TERMS if k.split("_", 1)[0] in modalities}
        balancer = LossBalancer("none", {k: w for k, w in weights.items() if w > 0})
        return TrainModule(model, balancer, train_cfg, model_cfg, penalties=False)
    raise ValueError(f"train module objective '{objective}' is not one of {', '.join(OBJECTIVES)}")
