"""The twin learns: trained on the simulated cohort, it forecasts held-out subjects better than persistence."""
from __future__ import annotations

from pathlib import Path

import pytest

from twinbrain.config import load_config
from twinbrain.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_simulated_cohort_beats_persistence_on_heldout_subjects(tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        "--run.out", str(tmp_path / "run"), "--sim.n_subjects", "4", "--sim.minutes", "10",
        "--sim.n_regions", "20", "--sim.n_channels", "8", "--graph.k_fmri", "4", "--model.hidden", "32",
        "--train.max_steps", "80", "--train.warmup_steps", "5", "--train.eval_every", "40",
        "--train.checkpoint_every", "80", "--train.batch_size", "4", "--logging.wandb", "disabled",
        "--logging.progress", "off", "--logging.flops", "false"])
    trainer = Trainer(cfg)
    metrics = trainer.train()
    trainer.tel.close()
    subjects = trainer.data.split.subjects
    assert subjects["val"] and not set(subjects["val"]) & set(subjects["train"])
    # Skill = (R2 - R2_persistence) / (1 - R2_persistence) on the validation subjects, never seen in training.
    assert metrics["fmri/persistence_r2_h1"] > 0.5          # persistence is a strong baseline for BOLD
    # 10 minutes per subject: with 4 minutes (2 x 120 training TRs for a 20-region VAR) no ridge VAR of any
    # order and alpha beats persistence at h2 on validation, so the claim would rest on too little data.
    # Measured 2026-12-01: skill h1 0.64 / h2 0.38 for the validation-tuned VAR(3) the core starts from.
    assert metrics["fmri/skill_h1"] > 0.25, metrics
    assert metrics["fmri/skill_h2"] > 0.1, metrics
    assert metrics["fmri/recon_r2"] > 0.8, metrics
