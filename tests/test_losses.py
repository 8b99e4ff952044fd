"""Loss terms: clean targets, masks, global-count normalisation (batch == accumulation), variants."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch

from tests.batches import make_window
from tests.test_model import N_E, N_F, SPT, STRIDE, T_F, make, tiny_cfg
from twinbrain.config import TrainConfig
from twinbrain.model import (ModelOutput, forecast_targets, forecast_valid, loss_counts, loss_term_names,
                             loss_terms, normalise)
from twinbrain.model.losses import gaussian_nll, latent_targets, pearson_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def _windows(n=2, **kw):
    return [make_window(N_F, N_E, T_F, SPT, subject=i, session=i, seed=20 + i, **kw) for i in range(n)]


def _values(terms):
    return {k: float(s.detach()) for k, (s, _) in terms.items()}


def test_term_names_and_counts_match_batch_only_counts():
    cfg, tc = tiny_cfg(probabilistic="gaussian"), TrainConfig()
    batch = Batch.from_data_list(_windows(masked_fmri=(1, 2), masked_eeg=(0,)))
    terms = loss_terms(batch, make(cfg)(batch), tc, cfg)
    assert sorted(terms) == sorted(loss_term_names())
    assert {k: c for k, (_, c) in terms.items()} == loss_counts(batch, tc, cfg)
    counts = loss_counts(batch, tc, cfg)
    assert counts["fmri_recon"] == (2 * N_F - 4) * T_F
    # fMRI, S = 2: steps t = 0..T-2 have horizon 1, t = 0..T-3 horizon 2.
    assert counts["fmri_forecast"] == (2 * N_F - 4) * ((T_F - 1) + (T_F - 2))


def test_forecast_target_indexing():
    y = torch.arange(12.0).view(1, 12)
    for step, s in ((1, 3), (2, 2), (3, 1)):
        tgt, valid = forecast_targets(y, step, s), forecast_valid(12, step, s)
        assert tgt.shape == (1, 12 // step, s * step) and valid.shape == tgt.shape[1:]
        for t in range(12 // step):
            for k in range(s * step):
                idx = (t + 1) * step + k
                assert bool(valid[t, k]) == (idx < 12)
                if idx < 12:
                    assert tgt[0, t, k] == idx
    z = torch.arange(5.0).view(1, 5, 1).expand(1, 5, 2)
    lt = latent_targets(z, 2)                       # [1, L, S, H]: entry [t, s] = z[t + 1 + s]
    assert lt.shape == (1, 5, 2, 2) and lt[0, 1, 1, 0] == 3 and lt[0, 3, 0, 1] == 4


def _fixed_output(cfg, batch):
    with torch.no_grad():
        out = make(cfg)(batch)
    return out


def test_losses_use_clean_targets_not_inputs():
    cfg, tc = tiny_cfg(), TrainConfig()
    batch = Batch.from_data_list(_windows())
    out = _fixed_output(cfg, batch)
    ref = _values(loss_terms(batch, out, tc, cfg))
    for m in ("fmri", "eeg"):                       # augmentation changes x only
        batch[m].x = batch[m].x + torch.randn_like(batch[m].x)
    assert _values(loss_terms(batch, out, tc, cfg)) == ref
    batch["fmri"].y = batch["fmri"].y + 1.0
    changed = _values(loss_terms(batch, out, tc, cfg))
    assert changed["fmri_recon"] != ref["fmri_recon"] and changed["fmri_forecast"] != ref["fmri_forecast"]


def test_masked_nodes_and_positions_past_the_window_are_ignored():
    cfg, tc = tiny_cfg(), TrainConfig()
    batch = Batch.from_data_list(_windows(masked_fmri=(3,), masked_eeg=(2,)))
    out = _fixed_output(cfg, batch)
    ref = _values(loss_terms(batch, out, tc, cfg))
    batch["fmri"].y[3] += 10.0
    batch["eeg"].y[2] += 10.0
    for m, step in (("fmri", 1), ("eeg", STRIDE)):
        out.recon[m][3 if m == "fmri" else 2] += 10.0
        invalid = ~forecast_valid(batch[m].y.shape[1], step, cfg.forecast_steps)
        out.forecast[m][:, invalid] += 10.0                 # targets beyond the window end
        out.latent_forecast[m][:, -1] += 10.0               # predicts latent steps past the end
    got = _values(loss_terms(batch, out, tc, cfg))
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-6), k


@pytest.mark.parametrize("probabilistic", ["none", "gaussian"])
def test_batch_gradient_equals_accumulated_single_windows(probabilistic):
    """sum over 2 windows / global count == accumulation of per-window sums / the same global count."""
    cfg, tc = tiny_cfg(probabilistic=probabilistic), TrainConfig()
    windows = _windows(masked_fmri=(0,))
    windows[1]["eeg"].mask[1] = False                      # different counts per window
    model = make(cfg)
    batch = Batch.from_data_list(windows)
    global_counts = loss_counts(batch, tc, cfg)

    def grads(batches):
        model.zero_grad()
        total = {}
        for b in batches:
            losses = normalise(loss_terms(b, model(b), tc, cfg), global_counts)
            sum(losses.values()).backward()
            for k, v in losses.items():
                total[k] = total.get(k, 0.0) + float(v.detach())
        return [p.grad.clone() for p in model.parameters()], total

    g_batch, l_batch = grads([batch])
    g_acc, l_acc = grads([Batch.from_data_list([w]) for w in windows])
    per_window = [loss_counts(Batch.from_data_list([w]), tc, cfg) for w in windows]
    assert {k: sum(c[k] for c in per_window) for k in global_counts} == global_counts
    for k in l_batch:
        assert l_batch[k] == pytest.approx(l_acc[k], rel=1e-5, abs=1e-7), k
    for a, b in zip(g_batch, g_acc):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("loss", ["huber", "mse", "smooth_l1"])
def test_loss_variants_are_finite_and_respect_delta(loss):
    cfg = tiny_cfg()
    batch = Batch.from_data_list(_windows())
    out = _fixed_output(cfg, batch)
    a = _values(loss_terms(batch, out, TrainConfig(loss=loss, huber_delta=0.5), cfg))
    b = _values(loss_terms(batch, out, TrainConfig(loss=loss, huber_delta=2.0), cfg))
    assert all(v == v and abs(v) < float("inf") for v in a.values())
    assert (a["fmri_forecast"] == b["fmri_forecast"]) == (loss == "mse")
    with pytest.raises(ValueError, match="train.loss"):
        loss_terms(batch, out, dataclasses.replace(TrainConfig(), loss="l1"), cfg)


def test_gaussian_head_positive_std_and_finite_nll():
    cfg, tc = tiny_cfg(probabilistic="gaussian"), TrainConfig()
    batch = Batch.from_data_list(_windows())
    out = make(cfg)(batch)
    for m in ("fmri", "eeg"):
        assert (out.forecast_std[m] > 0).all()
    terms = loss_terms(batch, out, tc, cfg)
    assert torch.isfinite(terms["fmri_forecast"][0]) and torch.isfinite(terms["eeg_forecast"][0])
    mean, std, y = torch.randn(50), torch.rand(50) + 0.1, torch.randn(50)
    ref = F.gaussian_nll_loss(mean, y, std ** 2, full=True, reduction="none")
    torch.testing.assert_close(gaussian_nll(mean, std, y), ref)


def test_gaussian_std_can_be_calibrated_post_hoc():
    from twinbrain.model.losses import gaussian_std_scale
    mean, y = torch.randn(4, 30, 2), torch.randn(4, 30, 2) * 3
    std, valid = torch.full_like(mean, 0.5), forecast_valid(30, 1, 2)
    c = gaussian_std_scale(mean, std, y, valid)
    z2 = ((y - mean) / (c * std)) ** 2
    assert float(z2[:, valid].mean()) == pytest.approx(1.0, rel=1e-5)
    nll = lambda s: float(gaussian_nll(mean, s, y)[:, valid].mean())
    assert nll(c * std) < min(nll(0.9 * c * std), nll(1.1 * c * std), nll(std))


def test_correlation_term():
    valid = forecast_valid(10, 1, 2)
    tgt = torch.randn(3, 10, 2)
    assert pearson_loss(tgt * 2 + 1, tgt, valid).abs().max() < 1e-4      # perfect up to affine
    assert (pearson_loss(-tgt, tgt, valid) - 2).abs().max() < 1e-4


def test_correlation_gradient_is_the_composition_and_keeps_only_the_inputs():
    """The hand-written backward of pearson_loss equals autograd through the plain formula (valid steps
    differ per horizon sample; a constant series hits the eps guard), keeping only the inputs and
    per-series statistics."""
    valid = forecast_valid(14, 2, 4)                                      # [7, 8]
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 7, 8, generator=g, requires_grad=True)
    tgt = torch.randn(3, 7, 8, generator=g)
    tgt[0, :, 0] = 1.5                                                   # constant target: r = 0 by the eps
    v = valid.float().unsqueeze(0)
    cnt = v.sum(1, keepdim=True).clamp_min(1)
    dp = (pred - (pred * v).sum(1, keepdim=True) / cnt) * v
    dt = (tgt - (tgt * v).sum(1, keepdim=True) / cnt) * v
    ref = 1 - (dp * dt).sum(1) / torch.sqrt((dp * dp).sum(1) * (dt * dt).sum(1) + 1e-8)
    got = pearson_loss(pred, tgt, valid)
    torch.testing.assert_close(got, ref)
    w = torch.randn(3, 8, generator=g)
    torch.testing.assert_close(torch.autograd.grad(got, pred, w)[0], torch.autograd.grad(ref, pred, w)[0])
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pearson_loss(pred, tgt, valid)
    stats = 5 * 3 * 8 * 4                                                  # 5 per-series statistics [N, 1, F]
    assert sum(kept.values()) == pred.numel() * 4 * 2 + valid.numel() + stats   # pred, target, bool mask


def test_normalise_divides_by_global_counts_and_survives_zero():
    terms = {"a": (torch.tensor(6.0), 3.0), "b": (torch.tensor(0.0), 0.0)}
    out = normalise(terms, {"a": 12.0, "b": 0.0})
    assert float(out["a"]) == 0.5 and float(out["b"]) == 0.0


def test_model_output_is_a_plain_dataclass():
    assert dataclasses.is_dataclass(ModelOutput)
