"""Validation during training: loss terms and forecast skill over a held-out split.

Every rank runs the same number of batches (padding batches carry ``batch.weight == 0`` and are
masked out); sums are all-reduced, so the numbers are global.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..model import forecast_targets, forecast_valid, loss_terms
from ..schema import MODALITIES, SIGNAL_LOSS_TERMS, node_mask, samples_per_step
from ..scoring.metrics import R2Accumulator, skill
from .distributed import all_reduce_


def _node_weight(batch, m: str) -> Tensor:
    """``[N]`` bool: real node of a real (non-padding) window."""
    store = batch[m]
    keep = node_mask(store)
    if "weight" in batch:
        keep = keep & (batch.weight[store.batch] > 0)
    return keep


def horizon_view(x: Tensor, s_steps: int) -> Tensor:
    """``[N, L, S*step]`` -> ``[N, L, step, S]``: the forecast horizon on the last axis."""
    n, l, f = x.shape
    return x.reshape(n, l, s_steps, f // s_steps).transpose(-1, -2)


def persistence_forecast(y: Tensor, step: int, s_steps: int) -> Tensor:
    """``[N, T]`` -> ``[N, L, S*step]``: the last observed sample of latent step t, held."""
    last = y[:, step - 1::step]                                   # [N, L]
    return last[:, :, None].expand(-1, -1, s_steps * step)


@torch.no_grad()
def validate(module, loader, model_cfg, train_cfg, device, dtype,
             modalities: tuple[str, ...] = MODALITIES) -> dict[str, float]:
    """Global validation metrics of the (wrapped) train module over one pass of ``loader``, for the
    ``modalities`` present in the cohort."""
    s_steps = model_cfg.forecast_steps
    terms_used = [n for n in SIGNAL_LOSS_TERMS if n.split("_", 1)[0] in modalities]
    steps = samples_per_step(model_cfg)
    r2 = {m: R2Accumulator(horizons=s_steps) for m in modalities}
    r2_pers = {m: R2Accumulator(horizons=s_steps) for m in modalities}
    r2_rec = {m: R2Accumulator() for m in modalities}
    sums = torch.zeros(len(terms_used) * 2, dtype=torch.float64, device=device)
    for batch in loader:
        batch = batch.to(device)
        if "weight" in batch:                       # padding windows contribute nothing
            for m in MODALITIES:
                batch[m].mask = _node_weight(batch, m)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = module(batch)
        terms = loss_terms(batch, out, train_cfg, model_cfg)
        for i, name in enumerate(terms_used):
            total, count = terms[name]
            sums[2 * i] += float(total)
            sums[2 * i + 1] += float(count)
        for m in modalities:
            keep = batch[m].mask.bool()
            y = batch[m].y.float()[..., 0]
            t_len, step = y.shape[1], steps[m]
            valid = horizon_view(forecast_valid(t_len, step, s_steps, y.device)[None].float(), s_steps)[0]
            mask = keep[:, None, None, None] & (valid[None] > 0)
            tgt = horizon_view(forecast_targets(y, step, s_steps), s_steps)
            r2[m].update(horizon_view(out.forecast[m].float(), s_steps), tgt, mask)
            r2_pers[m].update(horizon_view(persistence_forecast(y, step, s_steps), s_steps), tgt, mask)
            r2_rec[m].update(out.recon[m].float()[..., 0], y, keep[:, None])
    all_reduce_(sums)
    accs = [*r2.values(), *r2_pers.values(), *r2_rec.values()]
    for acc in accs:
        acc.all_reduce()
    metrics: dict[str, float] = {}
    total = 0.0
    for i, name in enumerate(terms_used):
        value = float(sums[2 * i] / sums[2 * i + 1].clamp_min(1))
        metrics[f"loss/{name}"] = value
        total += value
    metrics["loss"] = total
    for m in modalities:
        metrics[f"{m}/recon_r2"] = float(r2_rec[m].compute())
        model_r2, base_r2 = r2[m].compute().tolist(), r2_pers[m].compute().tolist()
        for h in range(s_steps):
            metrics[f"{m}/forecast_r2_h{h + 1}"] = model_r2[h]
            metrics[f"{m}/persistence_r2_h{h + 1}"] = base_r2[h]
            sk = skill(model_r2[h], base_r2[h])
            metrics[f"{m}/skill_h{h + 1}"] = float(sk) if sk is not None and math.isfinite(float(sk)) else math.nan
    return metrics
