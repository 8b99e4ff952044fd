"""Adaptive loss balancing: fixed weights, uncertainty weighting, or GradNorm.

Build the balancer BEFORE the optimizer and give its parameters to the optimizer (a balancer created
after it is never trained).  Every mode multiplies what it learns by the fixed prior weights of
:func:`twinbrain.model.losses.term_weight`; terms whose prior weight is 0 are left out (logged only).

* ``none``:        ``total = sum_i b_i L_i``.
* ``uncertainty``: Kendall, Gal & Cipolla (2018), homoscedastic uncertainty with ``s_i = log sigma_i^2``:
  ``total = sum_i b_i (exp(-s_i) L_i + s_i)`` (weight 1 at start; the optimum ``s_i = log L_i`` gives
  weight ``1 / L_i``).  ``s_i`` is clamped to [-6, 6] so a vanishing loss cannot take over.
* ``gradnorm``:    Chen et al. (2018).  Weights ``w = n * softmax(logits)`` (positive, summing to the
  number of tasks at every step, which replaces GradNorm's renormalisation); ``forward`` returns
  ``sum_i b_i w_i L_i`` with ``w`` detached, and :meth:`LossBalancer.gradnorm_loss` returns the GradNorm
  objective, whose gradient reaches only ``logits``.  Trainer step::

      losses = normalise(loss_terms(batch, out, ...), global_counts)
      total = balancer(losses)
      if balancer.mode == "gradnorm":
          total = total + balancer.gradnorm_loss(losses, model.shared_parameter())
      total.backward()
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from twinbrain.model.losses import term_weight

MODES = ("none", "uncertainty", "gradnorm")


class LossBalancer(nn.Module):
    """Combines ``{term: mean loss}`` into one scalar.

    Args:
        mode: ``none`` | ``uncertainty`` | ``gradnorm``.
        base_weights: ``{term: prior weight > 0}``; the balanced tasks, in order.
        alpha: GradNorm restoring rate (``train.gradnorm_alpha``).
    State (in ``state_dict``): ``log_vars`` (uncertainty) or ``logits``, ``initial_losses`` and
    ``initialized`` (gradnorm).
    """

    def __init__(self, mode: str, base_weights: dict[str, float], alpha: float = 1.5):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"train.balancer '{mode}' is not one of {', '.join(MODES)}")
        if not base_weights:
            raise ValueError("loss balancer: no loss term has a positive weight")
        self.mode, self.alpha = mode, alpha
        self.names = list(base_weights)
        self.register_buffer("base", torch.tensor([base_weights[n] for n in self.names], dtype=torch.float32))
        n = len(self.names)
        if mode == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(n))
        elif mode == "gradnorm":
            self.logits = nn.Parameter(torch.zeros(n))
            self.register_buffer("initial_losses", torch.ones(n))
            self.register_buffer("initialized", torch.tensor(False))

    def _stack(self, losses: dict[str, Tensor]) -> Tensor:
        missing = [n for n in self.names if n not in losses]
        if missing:
            raise KeyError(f"loss balancer: terms {missing} missing from the losses ({sorted(losses)})")
        return torch.stack([losses[n].float().reshape(()) for n in self.names])

    def task_weights(self) -> Tensor:
        """``[n_tasks]`` learned weights (without the prior weights); gradnorm weights carry gradients."""
        if self.mode == "uncertainty":
            return torch.exp(-self.log_vars.clamp(-6.0, 6.0))
        if self.mode == "gradnorm":
            return len(self.names) * torch.softmax(self.logits, 0)
        return torch.ones_like(self.base)

    def weighted(self, losses: dict[str, Tensor]) -> Tensor:
        """The part of the total that is linear in the losses: ``sum_i b_i w_i L_i``."""
        w = self.task_weights()
        if self.mode == "gradnorm":
            w = w.detach()          # GradNorm weights learn only from gradnorm_loss
        return (self.base * w * self._stack(losses)).sum()

    def regularizer(self) -> Tensor:
        """The loss-independent part of the total (uncertainty weighting's ``sum_i b_i s_i``; else 0).

        Kept separate so a trainer that sums the weighted part over micro-batches and ranks can add
        the regulariser once per optimizer step."""
        if self.mode == "uncertainty":
            return (self.base * self.log_vars.clamp(-6.0, 6.0)).sum()
        return torch.zeros((), device=self.base.device)

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        """``{term: scalar mean loss}`` -> scalar total (terms not balanced are ignored)."""
        return self.weighted(losses) + self.regularizer()

    def weights(self) -> dict[str, float]:
        """Effective multiplier of every balanced term (prior x learned), for logging."""
        with torch.no_grad():
            w = (self.base * self.task_weights()).tolist()
        return dict(zip(self.names, w))

    def gradnorm_loss(self, losses: dict[str, Tensor], shared_param: Tensor, sync: bool = True) -> Tensor:
        """GradNorm objective ``sum_i |w_i g_i - mean(w g) r_i^alpha|`` (gradient only into ``logits``).

        ``g_i = ||d L_i / d shared_param||`` is computed with ``torch.autograd.grad(retain_graph=True)``
        and treated as a constant (``||d(w_i L_i)|| = w_i g_i`` for a scalar ``w_i``), so no double
        backward runs and model parameters receive nothing from this term.  ``r_i`` is the relative
        inverse training rate from ``L_i / L_i(0)`` (``L_i(0)`` recorded on the first call, a buffer).
        With ``sync`` and an initialised process group of several ranks, ``g`` and ``L`` are averaged over
        ranks (every rank must call this every step) so all ranks get the same balancer gradient.  The
        autograd.grad calls do not fire DDP's gradient hooks; under FSDP2/DeepSpeed sharding prefer
        ``uncertainty`` (the shared weight is sharded there).
        """
        if self.mode != "gradnorm":
            raise RuntimeError(f"gradnorm_loss called but the balancer mode is '{self.mode}'")
        norms = []
        for name in self.names:
            loss = losses[name]
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss, shared_param, retain_graph=True, allow_unused=True)
            else:
                grad = None
            norms.append(grad.detach().float().norm() if grad is not None
                         else torch.zeros((), device=self.logits.device))
        g = torch.stack(norms).to(self.logits.device)
        vec = self._stack(losses).detach().to(self.logits.device)
        if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            both = torch.cat([g, vec])
            dist.all_reduce(both)
            both = both / dist.get_world_size()
            g, vec = both[: len(g)], both[len(g):]
        if not bool(self.initialized):
            self.initial_losses.copy_(vec.clamp_min(1e-8))
            self.initialized.fill_(True)
        ratio = vec / self.initial_losses
        rel = ratio / ratio.mean().clamp_min(1e-12)
        weighted = self.task_weights() * g
        target = (weighted.mean() * rel ** self.alpha).detach()
        return (weighted - target).abs().sum()


def make_balancer(train_cfg, term_names: list[str]) -> LossBalancer:
    """Balancer for ``train.balancer`` over the terms with a positive prior weight."""
    base = {n: term_weight(n, train_cfg) for n in term_names}
    base = {n: w for n, w in base.items() if w > 0}
    return LossBalancer(train_cfg.balancer, base, alpha=train_cfg.gradnorm_alpha)
