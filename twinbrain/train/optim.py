"""Optimizer parameter groups, learning-rate schedules and early stopping."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, TrainConfig

def param_groups(model: nn.Module, cfg: TrainConfig, extra: nn.Module | None = None) -> list[dict]:
    """The model's own groups (:meth:`TwinBrain.param_groups_spec`) with their optimizer settings:
    ``decay`` (weights), ``no_decay`` (biases, norms, identity embeddings, couplings, linear core) and
    ``embeddings`` (subject/session-specific: ``train.emb_lr``, no decay — they must move faster than
    shared weights and must not be shrunk to zero) and ``core`` (the linear core's population
    coefficients: ``train.core_lr_scale * train.lr``, no decay).

    ``extra`` (e.g. the loss balancer) joins ``no_decay``: it must exist before the optimizer is
    built, or it is never trained.
    """
    spec = model.param_groups_spec()
    group_of = {n: g for g, names in spec.items() for n in names}
    by_group: dict[str, list] = {"default": [], "no_decay": [], "embedding": [], "core": [], "gate": []}
    # Every model parameter, also one frozen at lr 0 (fixed_groups): the groups, and so a run's saved
    # optimizer and schedule state, keep one layout whatever is frozen (AdamW skips a parameter without grad).
    for name, p in model.named_parameters():
        group = group_of[name.replace("_checkpoint_wrapped_module.", "")]
        if group == "gate" and cfg.gate_lr_scale == 1:
            # The same lr and decay as no_decay, where runs saved before the gate group kept it: their
            # optimizer state then loads into the same groups (a resume of such a run sets the scale to 1).
            group = "no_decay"
        by_group[group].append(p)
    if extra is not None:
        by_group["no_decay"].extend(p for p in extra.parameters() if p.requires_grad)
    groups = [
        {"name": "decay", "params": by_group["default"], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": by_group["no_decay"], "lr": cfg.lr, "weight_decay": 0.0},
        {"name": "embeddings", "params": by_group["embedding"], "lr": cfg.emb_lr or cfg.lr, "weight_decay": 0.0},
        # The warm-started core is the closed-form optimum of its own ridge problem; Adam's ~lr-sized steps
        # on every one of its p·N² coefficients only undo the tuned penalties (measured: held-out h2 skill
        # 0.41 -> 0.26 in 80 steps at lr 1e-3), so by default it stays fixed.
        {"name": "core", "params": by_group["core"], "lr": cfg.lr * cfg.core_lr_scale, "weight_decay": 0.0},
        # The gate opens the nonlinear correction of the fMRI forecast. Trained at train.lr it lowered
        # held-out fMRI R² on every data set measured (quickstart test h4 0.253 -> 0.187, docs/RESULTS.md §1c),
        # so by default the fMRI forecast stays the validation-tuned core and the nonlinear path serves EEG,
        # reconstruction and the latent terms.
        {"name": "gate", "params": by_group["gate"], "lr": cfg.lr * cfg.gate_lr_scale, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def fixed_groups(cfg: TrainConfig) -> tuple[str, ...]:
    """The model's parameter groups trained at lr 0 (``train.core_lr_scale`` / ``train.gate_lr_scale`` 0):
    the trainer freezes them (:meth:`TwinBrain.freeze`), so no gradient is computed that no step uses."""
    return tuple(g for g, scale in (("core", cfg.core_lr_scale), ("gate", cfg.gate_lr_scale)) if scale == 0)


def build_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; the fused kernel on CUDA (one launch for all parameters)."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine down to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """One interface over the four schedules: ``step()`` after each optimizer step,
    ``on_eval(metric)`` after each validation (only ``plateau`` uses it)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.kind = cfg.scheduler
        self.optimizer = optimizer
        if self.kind == "cosine":
            self.impl = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
        elif self.kind == "constant":
            self.impl = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
        elif self.kind == "onecycle":
            self.impl = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=cfg.max_steps + 1,
                pct_start=max(cfg.warmup_steps / cfg.max_steps, 0.01), anneal_strategy="cos",
                cycle_momentum=False, final_div_factor=1.0 / cfg.min_lr_ratio)
        elif self.kind == "plateau":
            self.impl = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=0.5, patience=1, min_lr=[g["lr"] * cfg.min_lr_ratio
                                                                       for g in optimizer.param_groups])
        else:
            raise ValueError(f"train.scheduler: unknown schedule '{self.kind}'")

    def step(self) -> None:
        if self.kind != "plateau":
            self.impl.step()

    def on_eval(self, metric: float) -> None:
        if self.kind == "plateau" and math.isfinite(metric):
            self.impl.step(metric)

    def lrs(self) -> dict[str, float]:
        return {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def state_dict(self) -> dict:
        return self.impl.state_dict()

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("base_lrs", state.get("min_lrs"))
        if saved is not None and len(saved) != len(self.optimizer.param_groups):
            raise ConfigError(f"the checkpoint's learning-rate schedule has {len(saved)} parameter groups, this "
                              f"optimizer {len(self.optimizer.param_groups)}: it was written by a TwinBrain version "
                              "with another optimizer layout and cannot be resumed; start a new --run.out")
        self.impl.load_state_dict(state)


@dataclass
class EarlyStopping:
    """Stop after ``patience`` evaluations without improvement (lower is better); 0 disables."""
    patience: int
    best: float = math.inf
    bad_evals: int = 0

    def update(self, metric: float) -> tuple[bool, bool]:
        """Returns ``(improved, should_stop)``."""
        improved = math.isfinite(metric) and metric < self.best
        if improved:
            self.best, self.bad_evals = metric, 0
        else:
            self.bad_evals += 1
        return improved, bool(self.patience) and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_evals = float(state["best"]), int(state["bad_evals"])
