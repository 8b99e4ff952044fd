"""`--help` of every verb lists the config fields it reads, generated from the dataclasses."""
from __future__ import annotations

import dataclasses

import pytest

from twinbrain.cli import main
from twinbrain.config import Config
from twinbrain.config_help import config_fields


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_train_help_lists_every_field_with_type_default_and_meaning(capsys):
    out = _help(capsys, "train")
    assert "train.lr  float = 0.001" in out and "peak learning rate" in out
    cfg = Config()
    every = [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]
    assert len(every) > 100
    for key in every:
        assert f"  {key}  " in out, key
    # one source of truth: every field has a one-line meaning in config.py
    assert [k for k, _, _, meaning in config_fields() if not meaning] == []


def test_every_verb_documents_its_fields(capsys):
    assert "eval.baseline_orders  list[int] = [1, 2, 3, 4, 5]" in _help(capsys, "evaluate")
    assert "train.lr" not in _help(capsys, "evaluate")           # fixed by the checkpoint
    assert "sim.n_subjects  int = 8" in _help(capsys, "simulate-cohort")
    assert "graph.k_fmri  int = 8" in _help(capsys, "prepare")
    assert "logging.wandb  str = 'auto'" in _help(capsys, "report")
    assert "train.lr  float = 0.001" in _help(capsys, "config")
    assert "data.source  str = 'simulated'" in _help(capsys, "twin")
