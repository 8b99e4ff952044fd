"""The module every backend wraps: model + loss + balancer in one ``forward``.

Putting the loss and the balancer inside the wrapped module means DDP averages the balancer's
gradients like any other, FSDP2/ZeRO-3 gather its parameters during forward, and every parameter
is used on every step on every rank.
"""
from __future__ import annotations

from torch import nn

from ..model import loss_terms, normalise


class TrainModule(nn.Module):
    """``forward(batch, global_counts, data_scale, reg_scale) -> (loss, parts)``; without
    ``global_counts`` it returns the model output (evaluation).

    ``parts[term]`` is this micro-batch's share of the global mean of that term
    (``sum / global_count``); summed over micro-batches and ranks it is the global mean.
    The returned loss is ``data_scale * sum_i w_i parts_i + reg_scale * (R + P)`` where ``R`` is the
    balancer's regulariser (uncertainty weighting's ``sum_i s_i``) and ``P`` the model's coupling
    sparsity penalty, so that the gradients averaged by the backend over ranks and summed over
    micro-batches equal those of one big batch.
    """

    def __init__(self, model: nn.Module, balancer: nn.Module, train_cfg, model_cfg):
        super().__init__()
        self.model = model
        self.balancer = balancer
        self.train_cfg, self.model_cfg = train_cfg, model_cfg

    def forward(self, batch, global_counts: dict[str, float] | None = None, data_scale: float = 1.0,
                reg_scale: float = 1.0):
        out = self.model(batch)
        if global_counts is None:
            # Inference through the wrapper (FSDP2 must enter at its root to gather root parameters).
            return out
        terms = loss_terms(batch, out, self.train_cfg, self.model_cfg)
        parts = normalise(terms, global_counts)
        # The regulariser is counted once per optimizer step, not once per micro-batch and rank.
        loss = data_scale * self.balancer.weighted(parts) + reg_scale * (self.balancer.regularizer()
                                                                         + out.penalty)
        if getattr(self.balancer, "mode", "") == "gradnorm":
            shared = self.model.shared_parameter()
            loss = loss + reg_scale * self.balancer.gradnorm_loss(parts, shared)
        return loss, {k: v.detach() for k, v in parts.items()}
