"""`twinbrain evaluate`: report sections, causality in practice, same windows for model and baselines,
persistence against its closed form, held-out subjects, refusal of a mismatched split, validity section.

One smoke run is trained in-process by the real trainer (session fixture) and evaluated once on 4 windows.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from twinbrain.config import ConfigError, load_config
from twinbrain.data.module import DataModule
from twinbrain.eval.evaluate import EvaluationError, apply_overrides, evaluate_checkpoint, split_differences
from twinbrain.eval.forecast_eval import select_windows, truncate
from twinbrain.twin.loader import load_export

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--logging.wandb", "disabled", "--logging.progress", "off", "--logging.flops", "false"]
STEPS = ["--train.max_steps", "10", "--train.eval_every", "10", "--train.checkpoint_every", "10"]
N_WIN = 4


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """The smoke config trained for 10 steps by the real trainer; returns the export path."""
    from twinbrain.train.trainer import Trainer
    out = tmp_path_factory.mktemp("eval_run")
    trainer = Trainer(load_config(ROOT / "configs/smoke.yaml", ["--run.out", str(out), *QUIET, *STEPS]))
    try:
        trainer.train()
    finally:
        trainer.close()
    path = out / "best" / "model.pt"
    assert path.is_file()
    return path


@pytest.fixture(scope="session")
def report(run):
    return evaluate_checkpoint(run, split="test", overrides=["--eval.max_windows", str(N_WIN)],
                               device="cpu", mlp=False)


@pytest.fixture(scope="session")
def loaded(run):
    return load_export(run, "cpu")


@pytest.fixture(scope="session")
def data(loaded):
    return DataModule(loaded.config).setup()


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)
    else:
        yield x


def test_report_has_every_section_with_finite_numbers(report, run):
    out = Path(report["out_dir"])
    assert out == run.parent.parent / "eval"
    on_disk = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    for key in ("protocol", "forecast", "reconstruction", "causality", "validity", "data_checks"):
        assert key in on_disk
    p = on_disk["protocol"]
    assert p["n_windows"] == N_WIN and len(p["window_index"]) == N_WIN and p["split"] == "test"
    assert p["context_trs"] == p["window_trs"] - max(p["horizons"])
    for m in ("fmri", "eeg"):
        f = on_disk["forecast"][m]
        assert set(f["baselines"]) == {"persistence", "ar1", "ar", "var", "svar"}
        assert set(f["skill"]) == {"persistence", "strongest"}
        # skill is against the best baseline of each horizon, and the report names it
        for i, name in enumerate(f["strongest"]):
            best = max(v["r2"][i] for v in f["baselines"].values())
            assert f["baselines"][name]["r2"][i] == best
            assert f["skill"]["strongest"][i] == pytest.approx((f["model"]["r2"][i] - best) / (1 - best))
        assert p["baseline_tuning"][m]["var"]["chosen_on"] == "validation split"
        values = list(_numbers([f["model"], f["baselines"], f["skill"], on_disk["reconstruction"][m]]))
        assert values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), f
        assert f"## {m.upper()} forecast R²" in md
    assert "| **TwinBrain** |" in md and "skill vs persistence" in md and "Twin validity" in md
    assert "| strongest baseline |" in md and "skill vs strongest baseline" in md and "val-tuned" in md
    assert report["markdown"] == md


def test_model_and_baselines_score_the_same_elements(report, loaded):
    cfg, meta = loaded.config, loaded.metadata
    per_node = {"fmri": 1, "eeg": cfg.model.eeg_stride}
    slots = {"fmri": meta["n_fmri_slots"], "eeg": meta["n_eeg_slots"]}
    for m in ("fmri", "eeg"):
        f = report["forecast"][m]
        n = f["model"]["n"]
        assert n == [N_WIN * slots[m] * per_node[m]] * len(f["horizons"])
        # Same count is not enough: the target variance implied by each scorer's R² and MSE,
        # SS_tot = n * mse / (1 - R²), depends only on the scored target elements, so it must agree
        # between the model and every baseline (a baseline scored on other windows, nodes or horizons
        # would imply another one).
        implied = {name: np.array(s["mse"]) * np.array(s["n"]) / (1 - np.array(s["r2"]))
                   for name, s in {"model": f["model"], **f["baselines"]}.items()}
        for name, b in f["baselines"].items():
            assert b["n"] == n, name
            np.testing.assert_allclose(implied[name], implied["model"], rtol=1e-4, err_msg=f"{m} {name}")
        assert len(set(np.round(implied["model"], 6))) == len(f["horizons"]), "horizons share targets"


def test_persistence_matches_closed_form_on_the_same_windows(report, data, loaded):
    p = report["protocol"]
    ds = data.test_dataset
    t_ctx, spt, stride = p["context_trs"], p["samples_per_tr"], p["eeg_stride"]
    for m in ("fmri", "eeg"):
        c = t_ctx if m == "fmri" else t_ctx * spt
        step = 1 if m == "fmri" else stride
        for j, h in enumerate(p["horizons"]):
            preds, tgts = [], []
            for i in p["window_index"]:
                y = ds.window_arrays(i)[m].astype(np.float64)                  # [N, T]
                seg = y[:, c + (h - 1) * step:c + h * step]                       # samples of horizon h
                tgts.append(seg)
                preds.append(np.repeat(y[:, c - 1:c], step, axis=1))
            y, yhat = np.concatenate(tgts).ravel(), np.concatenate(preds).ravel()
            r2 = 1 - ((y - yhat) ** 2).sum() / ((y - y.mean()) ** 2).sum()
            assert report["forecast"][m]["baselines"]["persistence"]["r2"][j] == pytest.approx(r2, abs=1e-6)


def test_context_only_forecast_equals_full_window_forecast_at_last_context_step(report, data, loaded):
    model, cfg = loaded.model, loaded.config
    p = report["protocol"]
    t_ctx, spt = p["context_trs"], p["samples_per_tr"]
    wins = [data.test_dataset[i] for i in range(3)]
    with torch.no_grad():
        full = model(Batch.from_data_list(wins))
        ctx = model(Batch.from_data_list([truncate(w, t_ctx, spt) for w in wins]))
    lat = {"fmri": t_ctx, "eeg": t_ctx * spt // cfg.model.eeg_stride}
    for m in ("fmri", "eeg"):
        assert ctx.forecast[m].shape[1] == lat[m]
        torch.testing.assert_close(ctx.forecast[m][:, -1], full.forecast[m][:, lat[m] - 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ctx.recon[m], full.recon[m][:, :ctx.recon[m].shape[1]], atol=1e-5, rtol=1e-5)
        assert report["causality"][m] < 1e-4


def test_splits_never_share_subjects_and_test_windows_are_held_out(report, data, loaded):
    subj = loaded.metadata["split"]["subjects"]
    assert not set(subj["train"]) & set(subj["test"])
    assert not set(subj["train"]) & set(subj["val"])
    assert not set(subj["val"]) & set(subj["test"])
    assert report["protocol"]["subjects"] == subj["test"]
    recs = data.cohort.recordings
    seen = {recs[int(data.test_dataset.index[i, 0])].subject for i in report["protocol"]["window_index"]}
    assert seen <= set(subj["test"])
    assert report["data_checks"]["split_matches_checkpoint"] is True
    assert "train-span" not in report["data_checks"]["norm_sources"]


def test_checkpoint_with_a_different_split_is_refused(run, tmp_path):
    payload = torch.load(run, map_location="cpu", weights_only=True)
    split = payload["data"]["split"]
    split["test"], split["val"] = split["val"], split["test"]
    split["subjects"]["test"], split["subjects"]["val"] = split["subjects"]["val"], split["subjects"]["test"]
    bad = tmp_path / "best" / "model.pt"
    bad.parent.mkdir(parents=True)
    torch.save(payload, bad)
    with pytest.raises(EvaluationError, match="split saved in the checkpoint does not match"):
        evaluate_checkpoint(bad, device="cpu", mlp=False, validity=False)
    assert not (tmp_path / "eval").exists()


def test_split_differences_names_the_part_that_differs():
    a = {"train": [[0, 0.0, 100.0]], "val": [[1, 20.0, 100.0]], "test": [[2, 20.0, 100.0]],
         "calib": {"1": [0.0, 20.0], "2": [0.0, 20.0]}, "subjects": {"train": ["01"], "val": ["02"], "test": ["03"]}}
    b = json.loads(json.dumps(a))
    assert split_differences(a, b) == []
    b["test"][0][1] = 30.0
    b["subjects"]["test"] = ["04"]
    assert split_differences(a, b) == ["test", "subjects[test]"]


def test_overrides_are_limited_to_eval_keys(loaded):
    cfg = apply_overrides(loaded.config, ["--eval.max_windows", "3", "--eval.horizons", "[1]"])
    assert cfg.eval.max_windows == 3 and cfg.eval.horizons == [1]
    with pytest.raises(ConfigError, match="only --eval"):
        apply_overrides(loaded.config, ["--model.hidden", "32"])


def test_select_windows_honours_max_windows():
    assert select_windows(10, 0).tolist() == list(range(10))
    assert select_windows(10, 20).tolist() == list(range(10))
    sel = select_windows(10, 4)
    assert len(sel) == 4 and sel[0] == 0 and sel[-1] == 9


def test_validity_section_on_the_simulated_cohort(report):
    v = report["validity"]
    assert v["available"] is True
    ec = v["effective_connectivity"]
    assert ec["available"] is True
    for name in ("model", "linear_twin", "input_fc_graph"):
        for key in ("coupling_r", "coupling_auroc", "perturb_r", "perturb_auroc"):
            assert isinstance(ec[name][key], float) and math.isfinite(ec[name][key]), (name, key)
    assert -1 <= ec["model_vs_input_graph_r"] <= 1
    assert -1 <= v["fc"]["model_vs_empirical_r"] <= 1
    assert v["embeddings"]["k"] == 3 and 0 <= v["embeddings"]["nmi"] <= 1
    q = v["modularity"]
    assert all(isinstance(q[k], float) for k in ("ec", "learned_adjacency", "input_fc_graph", "true_coupling"))
