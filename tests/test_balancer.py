"""Loss balancers: fixed weights, uncertainty weighting, GradNorm; gradients, state and weight changes."""
from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

from tests.batches import make_window
from tests.test_model import N_E, N_F, SPT, T_F, make, tiny_cfg
from twinbrain.config import TrainConfig
from twinbrain.model import LossBalancer, loss_counts, loss_term_names, loss_terms, make_balancer, normalise


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(balancer: str):
    cfg, tc = tiny_cfg(), TrainConfig(balancer=balancer, gradnorm_alpha=1.5)
    model = make(cfg)
    bal = make_balancer(tc, loss_term_names())
    batch = Batch.from_data_list([make_window(N_F, N_E, T_F, SPT, seed=s, subject=s) for s in range(2)])
    counts = loss_counts(batch, tc, cfg)
    return cfg, tc, model, bal, lambda: normalise(loss_terms(batch, model(batch), tc, cfg), counts)


def test_make_balancer_uses_config_weights_and_drops_zero_terms():
    tc = TrainConfig(balancer="none", forecast_weight=2.0, corr_weight=0.0, latent_forecast_weight=0.5)
    bal = make_balancer(tc, loss_term_names())
    w = bal.weights()
    assert "fmri_corr" not in w and w["eeg_forecast"] == 2.0 and w["fmri_latent"] == 0.5 and w["eeg_recon"] == 1
    losses = {n: torch.tensor(float(i + 1)) for i, n in enumerate(loss_term_names())}
    expected = sum(w[n] * float(losses[n]) for n in w)
    assert float(bal(losses)) == pytest.approx(expected)
    assert list(bal.parameters()) == []
    with pytest.raises(ValueError, match="train.balancer"):
        LossBalancer("magic", {"a": 1.0})
    with pytest.raises(KeyError, match="missing"):
        bal({"fmri_recon": torch.tensor(1.0)})


def test_uncertainty_balancer_learns_weights():
    _, _, model, bal, losses_fn = _setup("uncertainty")
    before = bal.weights()
    opt = torch.optim.Adam(list(model.parameters()) + list(bal.parameters()), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        bal(losses_fn()).backward()
        assert bal.log_vars.grad is not None and bal.log_vars.grad.abs().sum() > 0
        opt.step()
    after = bal.weights()
    assert any(abs(after[k] - before[k]) > 1e-3 for k in before)
    assert "log_vars" in bal.state_dict()


def test_gradnorm_balancer_learns_weights_and_keeps_their_sum():
    _, _, model, bal, losses_fn = _setup("gradnorm")
    n = len(bal.names)
    opt = torch.optim.Adam(list(model.parameters()) + list(bal.parameters()), lr=2e-2)
    for i in range(5):
        losses = losses_fn()
        opt.zero_grad()
        gn = bal.gradnorm_loss(losses, model.shared_parameter())
        # The GradNorm objective trains only the balancer weights, never the model.
        assert all(g is None for g in torch.autograd.grad(gn, list(model.parameters()), retain_graph=True,
                                                          allow_unused=True))
        (bal(losses) + gn).backward()
        assert bal.logits.grad is not None and bal.logits.grad.abs().sum() > 0
        opt.step()
        assert float(bal.task_weights().sum()) == pytest.approx(n, rel=1e-5)
    assert bool(bal.initialized) and (bal.initial_losses != 1).any()
    learned = bal.task_weights().detach()
    assert (learned - 1).abs().max() > 1e-3
    state = bal.state_dict()
    assert {"logits", "initial_losses", "initialized"} <= set(state)
    fresh = make_balancer(TrainConfig(balancer="gradnorm"), loss_term_names())
    fresh.load_state_dict(state)
    assert fresh.weights() == pytest.approx(bal.weights())


def test_gradnorm_forward_gives_model_gradients_but_not_weight_gradients():
    _, _, model, bal, losses_fn = _setup("gradnorm")
    bal(losses_fn()).backward()
    assert bal.logits.grad is None
    assert model.shared_parameter().grad is not None
    with pytest.raises(RuntimeError, match="gradnorm"):
        make_balancer(TrainConfig(balancer="none"), loss_term_names()).gradnorm_loss({}, model.shared_parameter())
