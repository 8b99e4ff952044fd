"""The twin on a CUDA device: a model trained on the GPU (bf16 autocast) loads on CUDA and on CPU with the
same forecasts, and every question runs on the GPU."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from twinbrain.config import load_config
from twinbrain.twin import Twin

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = Path(__file__).resolve().parents[1]


def test_twin_questions_on_cuda(tmp_path):
    from twinbrain.data.simulate import simulate_cohort
    from twinbrain.train.trainer import Trainer
    cfg = load_config(ROOT / "configs/smoke.yaml", ["--run.out", str(tmp_path / "run"), "--logging.wandb", "disabled",
                                                    "--logging.progress", "off", "--logging.flops", "false"])
    trainer = Trainer(cfg)
    trainer.train()
    trainer.tel.close()
    export = tmp_path / "run" / "final" / "model.pt"
    gpu = Twin.from_checkpoint(export, device="cuda")
    cpu = Twin(Twin.from_checkpoint(export, device="cpu").model, gpu.cfg, gpu.meta, data=trainer.data)
    assert gpu.device.type == "cuda"
    ws = cpu.windows(split="test")
    fg, fc = gpu.forecast(ws[:4]), cpu.forecast(ws[:4])
    for m in ("fmri", "eeg"):
        np.testing.assert_allclose(fg[m], fc[m], atol=2e-3, rtol=1e-3)
    res = gpu.perturb(ws[0], [0, 3], amplitude=0.0, num_steps=5)
    assert max(np.abs(v).max() for v in res["delta"].values()) < 1e-5
    ec = gpu.effective_connectivity(ws[:3], horizon=2, batch_size=7)
    np.testing.assert_allclose(ec, cpu.effective_connectivity(ws[:3], horizon=2), atol=2e-3)
    att = gpu.attribute(ws[0], 3, method="integrated_gradients", steps=8, at_step=4)
    assert not att["fmri"][:, 5:].any()
    sim = dataclasses.replace(cfg.sim, n_subjects=5, minutes=4.0, subject_variability=0.3)
    recs = [r for r in simulate_cohort(sim).recordings if r.subject == "05"]
    new, report = gpu.personalize(recs, steps=30, lr=3e-2)
    assert new.device.type == "cuda"
    assert report["after"]["forecast_loss"] < report["before"]["forecast_loss"]
