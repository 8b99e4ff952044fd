"""Forecast roll-out, virtual stimulation and effective connectivity (batched) for a TwinBrain model.

Conventions (see docs/TWIN.md):

* A stimulus adds ``amplitude`` (z-units of the stimulated node's normalised signal) to the model INPUT
  ``x`` of the target nodes over input steps ``[onset, onset + duration)`` of the context window (fMRI:
  TRs; EEG: samples). Targets (the clean ``y``) are untouched.
* Forecasts start right after the context: fMRI step ``k`` is the volume ``k`` TRs after the context
  end; EEG forecast step ``k`` is latent step ``k`` (``eeg_stride`` samples).
* ``EC[i, j]`` = mean over windows and horizon steps of ``Δforecast_i / amplitude`` when node ``j`` is
  stimulated (the GroundTruth convention: influence of j on i).

All functions are autograd-friendly (no in-place writes into tensors that carry gradients), so a
Jacobian-vector product through :func:`predict` - including the roll-out - is well defined.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch_geometric.data import Batch

from twinbrain.schema import MODALITIES, samples_per_step


def with_inputs(batch, x: dict[str, Tensor]):
    """Shallow copy of ``batch`` whose ``[m].x`` are replaced by ``x[m]`` (``[N, T, 1]``); nothing else is
    copied and ``batch`` itself is not modified."""
    out = copy.copy(batch)
    for m, v in x.items():
        out[m].x = v
    return out


def stimulate(batch, modality: str, n_slots: int, copies: Tensor, slots: Tensor, amplitude: float,
              onset: int, duration: int):
    """Add ``amplitude`` to input ``x`` of node ``slots[k]`` in window (copy) ``copies[k]`` over input
    steps ``[onset, onset + duration)``. ``batch[modality].x`` is ``[B * n_slots, T, 1]`` in slot order.
    Returns a shallow copy with a new ``x``; the input batch is unchanged."""
    x = batch[modality].x
    t_len = x.shape[1]
    if not 0 <= onset < t_len or duration < 1 or onset + duration > t_len:
        raise ValueError(f"stimulus over input steps [{onset}, {onset + duration}) does not fit the {modality} "
                         f"context of {t_len} steps; choose 0 <= onset and onset + duration_steps <= {t_len}")
    bump = torch.zeros_like(x).view(-1, n_slots, t_len)
    bump[copies, slots, onset:onset + duration] = float(amplitude)
    return with_inputs(batch, {modality: x + bump.view_as(x)})


def _pad_time(x: Tensor, length: int) -> Tensor:
    """``[N, t]`` -> ``[N, length]`` (zero padded on the right; unknown future inputs)."""
    return F.pad(x, (0, length - x.shape[1])) if x.shape[1] < length else x


def predict(model, batch, steps: int, *, spt: int, stride: int, need=MODALITIES) -> dict[str, Tensor]:
    """Forecast ``steps`` steps of each modality in ``need`` after the end of the context.

    Returns ``{'fmri': [N_f, steps] (TRs), 'eeg': [N_e, steps * stride] (samples)}`` (+ ``'<m>_std'``
    for a Gaussian head when no roll-out is needed). ``spt``: EEG samples per TR; ``stride``: EEG
    samples per latent step.

    ``steps <= model.cfg.forecast_steps``: one forward pass, read at the last latent step.
    Longer: autoregressive roll-out. Known inputs grow by feeding forecasts back as inputs; each pass
    uses a window of the context length ``T`` ending at the newest known step (unknown inputs of a
    partly known last TR are zeros, which by causality cannot reach the step being read). The fMRI
    forecast from TR ``t`` is read only once the EEG of TR ``t`` is known, and the EEG forecast from
    latent step ``e`` only once the fMRI TR containing ``e`` is known, so every read sees exactly the
    inputs it would see in training. Both modalities are rolled out as far as ``need`` requires.
    """
    s_steps = model.cfg.forecast_steps
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    step = samples_per_step(eeg_stride=stride)
    if steps <= s_steps:
        out = model(batch)
        res = {m: out.forecast[m][:, -1, :steps * step[m]] for m in MODALITIES}
        if out.forecast_std is not None:
            res.update({f"{m}_std": out.forecast_std[m][:, -1, :steps * step[m]] for m in MODALITIES})
        return res
    r = spt // stride                                   # EEG latent steps per TR
    seq_f, seq_e = batch["fmri"].x[..., 0], batch["eeg"].x[..., 0]   # known inputs [N, kf], [N, ke * stride]
    t_len = seq_f.shape[1]
    kf, ke = t_len, t_len * r
    goal_f = t_len + (steps if "fmri" in need else 0)
    goal_e = t_len * r + (steps if "eeg" in need else 0)
    while kf < goal_f or ke < goal_e:
        f_ok, e_ok = ke >= kf * r, ke <= kf * r
        do_f = f_ok and (kf < goal_f or not e_ok)
        do_e = e_ok and (ke < goal_e or not f_ok)
        end = max(kf, -(-ke // r))
        start = end - t_len
        x_f = _pad_time(seq_f[:, start:end], t_len)
        x_e = _pad_time(seq_e[:, start * spt:end * spt], t_len * spt)
        out = model(with_inputs(batch, {"fmri": x_f.unsqueeze(-1), "eeg": x_e.unsqueeze(-1)}))
        if do_f:
            seq_f = torch.cat([seq_f, out.forecast["fmri"][:, kf - 1 - start, :]], dim=1)
            kf += s_steps
        if do_e:
            seq_e = torch.cat([seq_e, out.forecast["eeg"][:, ke - 1 - start * r, :]], dim=1)
            ke += s_steps
    res = {}
    if "fmri" in need:
        res["fmri"] = seq_f[:, t_len:t_len + steps]
    if "eeg" in need:
        res["eeg"] = seq_e[:, t_len * spt:t_len * spt + steps * stride]
    return res


def _pack(jobs: list[tuple[int, list[int]]], batch_size: int) -> list[list[tuple[int, list[int]]]]:
    """Group (window, nodes) jobs into passes of at most ``batch_size`` copies (1 + len(nodes) each)."""
    passes, cur, size = [], [], 0
    for job in jobs:
        need = 1 + len(job[1])
        if cur and size + need > batch_size:
            passes.append(cur)
            cur, size = [], 0
        cur.append(job)
        size += need
    if cur:
        passes.append(cur)
    return passes


@torch.no_grad()
def effective_connectivity(twin, windows: list, modality: str = "fmri", amplitude: float = 1.0,
                           signed: bool = True, horizon: int = 1, onset: int | None = None,
                           duration_steps: int = 1, batch_size: int = 64) -> np.ndarray:
    """Directed ``[N, N]`` effective connectivity of ``modality`` by virtual stimulation.

    For every window, one pass holds the baseline copy and up to ``batch_size - 1`` stimulated copies
    (copy ``q`` stimulates node ``q``); passes are packed across windows, so the whole matrix costs
    about ``W * (N + 1) / batch_size`` forward passes instead of ``W * N``. ``EC[i, j]`` is the mean
    over windows and over forecast steps ``1..horizon`` (and the samples of each EEG step) of
    ``(perturbed_i - baseline_i) / amplitude`` when ``j`` is stimulated; slots masked in a window are
    left out of its average (NaN where never present). ``signed=False`` returns ``|EC|``.
    """
    if amplitude == 0:
        raise ValueError("effective connectivity needs a non-zero amplitude (EC is Δforecast / amplitude)")
    n = twin.n_nodes(modality)
    group = max(1, batch_size - 1)
    jobs = [(w, list(range(a, min(n, a + group)))) for w in range(len(windows)) for a in range(0, n, group)]
    acc = torch.zeros(n, n, dtype=torch.float64)
    cnt = torch.zeros(n, n, dtype=torch.float64)
    for jobs_in_pass in _pack(jobs, batch_size):
        data, copies, slots, heads = [], [], [], []
        for w, nodes in jobs_in_pass:
            heads.append(len(data))
            data += [windows[w]] * (1 + len(nodes))
            copies += [heads[-1] + 1 + q for q in range(len(nodes))]
            slots += nodes
        batch = Batch.from_data_list(data).to(twin.device)
        twin.check_slots(batch)
        t_len = batch[modality].x.shape[1]
        start = t_len - duration_steps if onset is None else onset
        stim = stimulate(batch, modality, n, torch.tensor(copies), torch.tensor(slots), amplitude, start,
                         duration_steps)
        pred = twin.predict(stim, horizon, need=(modality,))[modality]
        pred = pred.double().view(len(data), n, -1).mean(-1)              # [copies, N] mean over horizon
        mask = batch[modality].mask.view(len(data), n).cpu() if "mask" in batch[modality] else \
            torch.ones(len(data), n, dtype=torch.bool)
        for (w, nodes), h in zip(jobs_in_pass, heads):
            delta = ((pred[h + 1:h + 1 + len(nodes)] - pred[h]) / amplitude).cpu()   # [j, i]
            ok = (mask[h][None, :] & mask[h][nodes][:, None]).double()           # [j, i]
            acc[:, nodes] += (delta * ok).t()
            cnt[:, nodes] += ok.t()
    ec = torch.where(cnt > 0, acc / cnt.clamp_min(1), torch.full_like(acc, float("nan"))).numpy()
    return ec if signed else np.abs(ec)


def jacobian_ec(twin, windows: list, modality: str = "fmri", horizon: int = 1, at_step: int | None = None,
                batch_size: int = 64) -> np.ndarray:
    """Directed ``[N, N]`` EC as the Jacobian of the forecast: ``EC[i, j]`` = mean over windows and forecast
    steps ``1..horizon`` of ``d forecast_i / d x_j(at_step)`` (default: the last context step), by
    forward-mode autodiff; equal to :func:`effective_connectivity` in the limit of a small amplitude.

    One pass holds ``max(1, batch_size // N)`` distinct windows once; ``torch.func.vmap`` over ``jvp`` pushes
    the ``N`` one-hot source tangents (in chunks of ``batch_size``) through it, so the primal forward runs
    once per pass rather than once per source copy (measured in docs/PERFORMANCE.md)."""
    n = twin.n_nodes(modality)
    per_pass = max(1, batch_size // max(n, 1))
    acc = torch.zeros(n, n, dtype=torch.float64)
    cnt = torch.zeros(n, n, dtype=torch.float64)
    for a in range(0, len(windows), per_pass):
        part = [windows[k] for k in range(a, min(len(windows), a + per_pass))]
        batch = Batch.from_data_list(part).to(twin.device)
        twin.check_slots(batch)
        x = batch[modality].x                                           # [W * N, T, 1]
        w, t_len = len(part), x.shape[1]
        step = t_len - 1 if at_step is None else int(at_step)
        if not 0 <= step < t_len:
            raise ValueError(f"at_step={step} is outside the {modality} context of {t_len} steps")
        src = torch.arange(n, device=x.device)
        tangents = torch.zeros(n, w, n, t_len, dtype=x.dtype, device=x.device)   # [source, W, N, T]
        tangents[src, :, src, step] = 1.0

        def forecast(x_in):
            return twin.predict(with_inputs(batch, {modality: x_in}), horizon, need=(modality,))[modality]

        def column(tangent):
            return torch.func.jvp(forecast, (x,), (tangent.view_as(x),))[1]

        # The fused attention kernels have no forward-mode derivative; the math kernel (same result) has.
        with sdpa_kernel(SDPBackend.MATH):
            jv = torch.func.vmap(column, chunk_size=max(1, batch_size))(tangents)   # [source, W * N, H]
        jv = jv.detach().double().view(n, w, n, -1).mean(-1).cpu()              # [j, W, i]
        mask = batch[modality].mask.view(w, n).cpu() if "mask" in batch[modality] else \
            torch.ones(w, n, dtype=torch.bool)
        ok = (mask[:, None, :] & mask[:, :, None]).double()                    # [W, j, i]
        acc += (jv.transpose(0, 1) * ok).sum(0).t()
        cnt += ok.sum(0).t()
    return torch.where(cnt > 0, acc / cnt.clamp_min(1), torch.full_like(acc, float("nan"))).numpy()
