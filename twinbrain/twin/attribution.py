"""Attribution of one forecast to every input node and time step (gradient x input, integrated gradients).

The explained quantity is ``f(x) = mean_k forecast[modality][node, at_step, (horizon-1)*step + k]``: the
model's prediction of forecast step ``horizon`` made at latent step ``at_step`` (default: the last one,
i.e. the forecast after the whole context). Attributions have the input layout of each modality:
``fmri [N_f, T_f]`` (TRs) and ``eeg [N_e, T_e]`` (samples), in units of the forecast (z).

* ``grad_x_input``: ``x * df/dx``.
* ``integrated_gradients``: ``x * mean_a df/dx(a x)`` over ``steps`` midpoints ``a = (k + 0.5) / steps``
  of the straight path from the all-zero input (every node at its mean) to ``x``; all ``steps`` scaled
  copies go through the model as ONE batch. Completeness: ``sum(attr) ~= f(x) - f(0)`` (reported).

Causality: inputs after the end of latent step ``at_step`` cannot change ``f``, so their attribution is
exactly zero (tested).
"""
from __future__ import annotations

import torch
from torch_geometric.data import Batch, HeteroData

from twinbrain.schema import MODALITIES
from twinbrain.twin.perturb import with_inputs

METHODS = ("grad_x_input", "integrated_gradients")


def _target(out, modality: str, rows, t: int, sl: slice):
    return out.forecast[modality][rows, t, sl].float().mean(-1)


def _grads(value, xs: dict) -> list:
    """d value / d x per modality; zeros where an input does not reach the value (e.g. fMRI for EEG)."""
    grads = torch.autograd.grad(value, [xs[m] for m in MODALITIES], allow_unused=True)
    return [torch.zeros_like(xs[m]) if g is None else g for m, g in zip(MODALITIES, grads)]


def attribute(twin, window, target_node, modality: str = "fmri", horizon: int = 1,
              method: str = "grad_x_input", steps: int = 32, at_step: int | None = None) -> dict:
    """Attributions ``{'fmri': [N_f, T_f], 'eeg': [N_e, T_e]}`` (numpy float32) of one forecast value.

    Args:
        window: one window (HeteroData, or a Batch / list holding exactly one).
        target_node: slot or name of the explained node of ``modality``.
        horizon: forecast step 1..S (fMRI: TRs ahead; EEG: latent steps ahead, averaged over its samples).
        at_step: latent step the forecast is made at (fMRI: TR index; EEG: latent step index);
            default the last one.
        steps: path points for integrated gradients.
    Also returns ``value`` = f(x), ``target_time_s`` (start of the predicted step, s from window start),
    ``last_input`` = {m: last input index that can influence f}, and for integrated gradients
    ``baseline_value`` = f(0) and ``completeness_gap`` = sum(attr) - (f(x) - f(0)).
    """
    if method not in METHODS:
        raise ValueError(f"method '{method}' is not one of {METHODS}")
    s_steps = twin.forecast_steps
    if not 1 <= horizon <= s_steps:
        raise ValueError(f"horizon {horizon} is outside 1..{s_steps} (model.forecast_steps)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batch, _ = twin.batch(window)
    if batch.num_graphs != 1:
        raise ValueError(f"attribute explains one window; got {batch.num_graphs}")
    nodes = twin.node_index(modality, target_node)
    if len(nodes) != 1:
        raise ValueError(f"attribute explains one target node, got {len(nodes)}")
    node = nodes[0]
    step = twin.step_samples(modality)
    n_lat = batch[modality].x.shape[1] // step
    t = n_lat - 1 if at_step is None else int(at_step)
    if not 0 <= t < n_lat:
        raise ValueError(f"at_step {t} is outside 0..{n_lat - 1} (latent steps of the {modality} window)")
    sl = slice((horizon - 1) * step, horizon * step)
    x = {m: batch[m].x.detach() for m in MODALITIES}
    model = twin.model
    extra: dict = {}
    if method == "grad_x_input":
        xs = {m: x[m].clone().requires_grad_(True) for m in MODALITIES}
        value = _target(model(with_inputs(batch, xs)), modality, node, t, sl)
        grads = _grads(value, xs)
        attr = {m: (g * x[m])[..., 0] for m, g in zip(MODALITIES, grads)}
    else:
        one = window if isinstance(window, HeteroData) and not isinstance(window, Batch) else batch.get_example(0)
        big = Batch.from_data_list([one] * steps).to(twin.device)
        alphas = ((torch.arange(steps, dtype=torch.float32) + 0.5) / steps).to(twin.device)
        xs = {m: (alphas.view(-1, 1, 1, 1) * x[m].unsqueeze(0)).reshape(-1, *x[m].shape[1:]).detach()
              .requires_grad_(True) for m in MODALITIES}
        rows = torch.arange(steps, device=twin.device) * twin.n_nodes(modality) + node
        total = _target(model(with_inputs(big, xs)), modality, rows, t, sl).sum()
        grads = _grads(total, xs)
        attr = {m: (g.view(steps, *x[m].shape).mean(0) * x[m])[..., 0] for m, g in zip(MODALITIES, grads)}
        with torch.no_grad():
            value = _target(model(batch), modality, node, t, sl)
            zero = _target(model(with_inputs(batch, {m: torch.zeros_like(x[m]) for m in MODALITIES})),
                           modality, node, t, sl)
        total_attr = float(sum(a.double().sum() for a in attr.values()))
        extra = {"baseline_value": float(zero), "completeness_gap": total_attr - float(value - zero)}
    spt = twin.samples_per_tr
    if modality == "fmri":
        last = {"fmri": t, "eeg": (t + 1) * spt - 1}
        target_time = (t + horizon) * twin.tr
    else:
        last = {"fmri": ((t + 1) * step - 1) // spt, "eeg": (t + 1) * step - 1}
        target_time = (t + horizon) * step / twin.eeg_sfreq
    return {"fmri": attr["fmri"].detach().cpu().numpy(), "eeg": attr["eeg"].detach().cpu().numpy(),
            "value": float(value.detach()), "method": method, "modality": modality, "target_node": node,
            "target_name": twin.node_names(modality)[node], "horizon": horizon, "at_step": t,
            "target_time_s": target_time, "last_input": last, **extra}

