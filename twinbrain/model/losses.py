"""Loss terms as ``(sum, count)`` pairs, normalised by GLOBAL counts.

Terms (per modality ``m``): ``m_recon`` (reconstruction), ``m_forecast`` (signal-space forecast; Gaussian
NLL when ``model.probabilistic == 'gaussian'``), ``m_corr`` (``1 - Pearson r`` of forecast vs target over
time, one unit per (window, node, horizon sample)), ``m_latent`` (forecast latents vs detached future
latents, averaged over channels).  Targets are always the clean ``batch[m].y``, never the (augmented)
input ``x``.  Nodes whose slot has no data (``mask`` False) and forecast positions whose target lies past
the window end are left out of sums and counts.

Why sums and counts: the trainer calls :func:`loss_counts` on every micro-batch of a step (it needs the
batch only, no forward), all-reduces the totals over micro-batches and ranks *before* backward, and
back-propagates ``normalise(loss_terms(...), global_counts)`` per micro-batch.  Every element then
carries weight ``1 / global_count`` whichever micro-batch or rank it sits in, so a batch of 8 windows
gives exactly the gradient of 8 single-window accumulation steps (tests/test_losses.py checks it).
All arithmetic is fp32 (outputs are cast up under bf16).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from twinbrain.schema import MODALITIES, SIGNAL_KINDS, node_mask, samples_per_step

KINDS = (*SIGNAL_KINDS, "corr", "latent")


def loss_term_names(modalities: tuple[str, ...] = MODALITIES) -> list[str]:
    """``['fmri_recon', 'fmri_forecast', 'fmri_corr', 'fmri_latent', 'eeg_recon', ...]``."""
    return [f"{m}_{k}" for m in modalities for k in KINDS]



def term_weight(name: str, train_cfg) -> float:
    """Fixed prior weight of a term from ``TrainConfig`` (recon 1, forecast ``forecast_weight``,
    corr ``corr_weight``, latent ``latent_forecast_weight``); balancers multiply what they learn by it."""
    kind = name.split("_", 1)[1]
    return {"recon": 1.0, "forecast": train_cfg.forecast_weight, "corr": train_cfg.corr_weight,
            "latent": train_cfg.latent_forecast_weight}[kind]


def elementwise_loss(pred: Tensor, target: Tensor, train_cfg) -> Tensor:
    """Unreduced ``train.loss`` (huber | mse | smooth_l1 with ``train.huber_delta``) in fp32."""
    pred, target = pred.float(), target.float()
    if train_cfg.loss == "huber":
        return F.huber_loss(pred, target, reduction="none", delta=train_cfg.huber_delta)
    if train_cfg.loss == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=train_cfg.huber_delta)
    if train_cfg.loss == "mse":
        return F.mse_loss(pred, target, reduction="none")
    raise ValueError(f"train.loss '{train_cfg.loss}' is not one of huber, mse, smooth_l1")


def gaussian_nll(mean: Tensor, std: Tensor, target: Tensor) -> Tensor:
    """Unreduced negative log-likelihood of ``target`` under ``N(mean, std^2)`` (fp32)."""
    std = std.float()
    return 0.5 * math.log(2 * math.pi) + torch.log(std) + 0.5 * ((target.float() - mean.float()) / std) ** 2


def gaussian_std_scale(mean: Tensor, std: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Post-hoc calibration of a Gaussian forecast head: the scalar ``c`` that maximises the
    likelihood of ``N(mean, (c * std)^2)`` on held-out data is ``c = sqrt(weighted mean of z^2)`` with
    ``z = (target - mean) / std``; multiply ``forecast_std`` by it (per modality, from validation
    windows).  ``weight`` broadcasts to ``mean`` (node mask x valid positions).  Returns a 0-dim tensor."""
    z2 = ((target.float() - mean.float()) / std.float()) ** 2
    w = weight.float().expand_as(z2)
    return torch.sqrt((z2 * w).sum() / w.sum().clamp_min(1))


def forecast_valid(t_len: int, step: int, s_steps: int, device=None) -> Tensor:
    """``[L, S * step]`` bool: entry ``[t, k]`` targets sample ``(t + 1) * step + k``, valid if ``< t_len``."""
    t = torch.arange(t_len // step, device=device).unsqueeze(1)
    k = torch.arange(s_steps * step, device=device).unsqueeze(0)
    return (t + 1) * step + k < t_len


def latent_valid(l_len: int, s_steps: int, device=None) -> Tensor:
    """``[L, S]`` bool: ``latent_forecast[:, t, s]`` targets latent step ``t + 1 + s``, valid if ``< L``."""
    t = torch.arange(l_len, device=device).unsqueeze(1)
    s = torch.arange(s_steps, device=device).unsqueeze(0)
    return t + 1 + s < l_len


def forecast_targets(y: Tensor, step: int, s_steps: int) -> Tensor:
    """``y [N, T] -> [N, L, S * step]`` with entry ``[n, t, k] = y[n, (t + 1) * step + k]`` (0 past the end)."""
    f = s_steps * step
    return F.pad(y, (0, f))[:, step:].unfold(1, f, step)


def latent_targets(z: Tensor, s_steps: int) -> Tensor:
    """``z [N, L, H] -> [N, L, S, H]`` with entry ``[n, t, s] = z[n, t + 1 + s]`` (0 past the end)."""
    return F.pad(z, (0, 0, 0, s_steps))[:, 1:].unfold(1, s_steps, 1).permute(0, 1, 3, 2)


def _counts_from(t_len: dict[str, int], n_valid: dict[str, float], model_cfg) -> dict[str, float]:
    """Counts of every term from window lengths and numbers of valid nodes (shared by both APIs)."""
    s_steps, out = model_cfg.forecast_steps, {}
    for m in MODALITIES:
        step = samples_per_step(model_cfg)[m]
        fv = forecast_valid(t_len[m], step, s_steps)
        out[f"{m}_recon"] = n_valid[m] * t_len[m]
        out[f"{m}_forecast"] = n_valid[m] * float(fv.sum())
        out[f"{m}_corr"] = n_valid[m] * float((fv.sum(0) >= 2).sum())
        out[f"{m}_latent"] = n_valid[m] * float(latent_valid(t_len[m] // step, s_steps).sum())
    return out


def loss_counts(batch, train_cfg, model_cfg) -> dict[str, float]:
    """Element counts of every term of :func:`loss_terms`, from the batch alone (no forward pass)."""
    t_len = {m: batch[m].y.shape[1] for m in MODALITIES}
    n_valid = {m: float(node_mask(batch[m]).sum()) for m in MODALITIES}
    return _counts_from(t_len, n_valid, model_cfg)


class _PearsonLossFn(torch.autograd.Function):
    """``1 - r`` per (node, horizon sample) keeping only its inputs and per-series statistics for backward
    (autograd keeps the centred forecast and target, each the full ``[N, L, F]``; the forecast itself is kept
    by the forecast loss anyway and the target is a view of the window). With ``dp = v (p - m_p)``,
    ``dt = v (t - m_t)``, ``c = sum dp dt``, ``S = sqrt(sum dp^2 sum dt^2 + eps)``:
    ``d r / d p = v (dt / S - c sum dt^2 / S^3 dp)`` (the means' own derivatives cancel: centred series sum
    to 0), i.e. ``v (t / S - k p + (k m_p - m_t / S))`` with ``k = c sum dt^2 / S^3``: one pass, no sums."""

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, valid: Tensor, eps: float) -> Tensor:
        v = valid.float().unsqueeze(0)
        cnt = v.sum(1, keepdim=True).clamp_min(1)
        pred, target = pred.float(), target.float()
        m_p, m_t = (pred * v).sum(1, keepdim=True) / cnt, (target * v).sum(1, keepdim=True) / cnt
        dp, dt = (pred - m_p) * v, (target - m_t) * v
        c, tt = (dp * dt).sum(1, keepdim=True), (dt * dt).sum(1, keepdim=True)
        s = torch.sqrt((dp * dp).sum(1, keepdim=True) * tt + eps)
        ctx.save_for_backward(pred, target, valid, m_p, m_t, c, tt, s)
        return 1 - (c / s).squeeze(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pred, target, valid, m_p, m_t, c, tt, s = ctx.saved_tensors
        k = c * tt / s ** 3                                                   # [N, 1, F] each
        dr = (target / s).addcmul_(pred, k, value=-1).add_(k * m_p - m_t / s)
        return dr.mul_(valid.unsqueeze(0)).mul_(-grad.unsqueeze(1)).to(pred.dtype), None, None, None


def pearson_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """``1 - r`` per (node, horizon sample) over the valid time steps: ``[N, L, F]`` x2, ``valid [L, F]``
    -> ``[N, F]`` (fp32). No gradient flows to ``target``."""
    return _PearsonLossFn.apply(pred, target.detach(), valid, 1e-8)


def loss_terms(batch, out, train_cfg, model_cfg) -> dict[str, tuple[Tensor, float]]:
    """``{term: (sum, count)}`` for one (micro-)batch; ``out`` is the model's ``ModelOutput``.

    Sums are fp32 scalars carrying gradients; counts equal :func:`loss_counts` of the same batch.
    """
    s_steps = model_cfg.forecast_steps
    gaussian = model_cfg.probabilistic == "gaussian"
    t_len = {m: batch[m].y.shape[1] for m in MODALITIES}
    masks = {m: node_mask(batch[m]) for m in MODALITIES}
    counts = _counts_from(t_len, {m: float(masks[m].sum()) for m in MODALITIES}, model_cfg)
    terms = {}
    for m in MODALITIES:
        step, dev = samples_per_step(model_cfg)[m], batch[m].y.device
        y = batch[m].y.float()[..., 0]                                           # [N, T] clean target
        node = masks[m].float()
        rec = elementwise_loss(out.recon[m][..., 0], y, train_cfg)
        terms[f"{m}_recon"] = ((rec * node[:, None]).sum(), counts[f"{m}_recon"])

        tgt = forecast_targets(y, step, s_steps)                                 # [N, L, F]
        fv = forecast_valid(t_len[m], step, s_steps, dev)
        pred = out.forecast[m]
        el = gaussian_nll(pred, out.forecast_std[m], tgt) if gaussian else elementwise_loss(pred, tgt, train_cfg)
        # Masked in two broadcast products: a full [N, L, F] weight would be kept for backward.
        terms[f"{m}_forecast"] = ((el * fv.float() * node[:, None, None]).sum(), counts[f"{m}_forecast"])

        unit = (fv.sum(0) >= 2).float()                                          # [F] horizons with >= 2 points
        corr = pearson_loss(pred, tgt, fv) * node[:, None] * unit
        terms[f"{m}_corr"] = (corr.sum(), counts[f"{m}_corr"])

        z = out.latent[m].detach()                                               # targets carry no gradient
        lv = latent_valid(z.shape[1], s_steps, dev).float()
        # Channel mean as a sum times 1/H in the small weight: mean's backward materialises a full-size quotient.
        lat = elementwise_loss(out.latent_forecast[m], latent_targets(z, s_steps), train_cfg).sum(-1)
        weight = node[:, None, None] * lv / z.shape[-1]
        terms[f"{m}_latent"] = ((lat * weight).sum(), counts[f"{m}_latent"])
    return terms


def normalise(terms: dict[str, tuple[Tensor, float]], global_counts: dict[str, float]) -> dict[str, Tensor]:
    """``{term: sum / global_count}`` (a term with global count 0 gives 0, not NaN).

    ``global_counts`` are the counts summed over all micro-batches of the step and all ranks."""
    return {k: s / max(float(global_counts[k]), 1.0) for k, (s, _) in terms.items()}
