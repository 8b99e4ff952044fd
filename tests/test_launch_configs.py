"""Every shipped Accelerate launch config and DeepSpeed JSON constructs and maps to a backend."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from twinbrain.config import ConfigError, load_config
from twinbrain.train.distributed import hide_sharding_env, ignored_launch_keys, resolve_backend, resolve_precision
from twinbrain.train.parallel import deepspeed_config

REPO = Path(__file__).resolve().parents[1]
ACCEL = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
EXPECTED = {"cpu": "ddp", "single": "single", "ddp": "ddp", "fsdp2": "fsdp2", "deepspeed_zero1": "deepspeed",
            "deepspeed_zero2": "deepspeed", "deepspeed_zero3": "deepspeed", "multinode": "ddp"}


def launcher_env(path: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file path`` gives each worker (backend part)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    env = {"WORLD_SIZE": str(max(cfg.num_processes, 1))}
    if cfg.distributed_type.value == "DEEPSPEED":
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        ds = cfg.deepspeed_config
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(REPO / ds["deepspeed_config_file"])
    elif cfg.distributed_type.value == "FSDP":
        env["ACCELERATE_USE_FSDP"] = "true"
        env["FSDP_VERSION"] = str(cfg.fsdp_config.get("fsdp_version", 1))
        env["FSDP_RESHARD_AFTER_FORWARD"] = str(cfg.fsdp_config.get("fsdp_reshard_after_forward", True)).lower()
    return env


def test_all_launch_configs_are_covered():
    assert {p.stem for p in ACCEL} == set(EXPECTED)


@pytest.mark.parametrize("path", ACCEL, ids=lambda p: p.stem)
def test_launch_config_constructs_and_selects_backend(path, monkeypatch):
    for key, value in launcher_env(path).items():
        monkeypatch.setenv(key, value)
    backend = resolve_backend(load_config())
    assert backend.name == EXPECTED[path.stem]
    if backend.name == "deepspeed":
        assert backend.zero_stage == int(path.stem[-1])
        ds = deepspeed_config(load_config(), backend, torch.bfloat16)
        assert "auto" not in json.dumps(ds), "every 'auto' must be filled from the run config"
        assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["bf16"]["enabled"] is True
    hide_sharding_env()
    import os
    assert not any(k.startswith(("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_")) for k in os.environ)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_deepspeed_json_fills_autos(name):
    from twinbrain.train.distributed import Backend

    path = REPO / "ds_configs" / f"{name}.json"
    raw = json.loads(path.read_text())
    stage = raw["zero_optimization"]["stage"]
    cfg = load_config(None, ["--train.batch_size", "3", "--train.grad_accum", "2", "--train.grad_clip", "0.5"])
    ds = deepspeed_config(cfg, Backend("deepspeed", stage, str(path)), None)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    assert "optimizer" not in ds  # ours is torch AdamW: DeepSpeed's would JIT-compile kernels


def test_backend_errors_are_clear(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="single"):
        resolve_backend(load_config(None, ["--parallel.backend", "single"]))
    with pytest.raises(ConfigError, match="gradnorm"):
        resolve_backend(load_config(None, ["--parallel.backend", "fsdp2", "--train.balancer", "gradnorm"]))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP2"):
        resolve_backend(load_config())


def test_accelerate_mixed_precision_is_honoured_or_refused():
    assert resolve_precision("auto", {}) == "auto"                                     # train.precision decides
    assert resolve_precision("fp32", {"ACCELERATE_MIXED_PRECISION": "no"}) == "fp32"
    assert resolve_precision("auto", {"ACCELERATE_MIXED_PRECISION": "bf16"}) == "bf16"
    assert resolve_precision("bf16", {"ACCELERATE_MIXED_PRECISION": "bf16"}) == "bf16"
    with pytest.raises(ConfigError, match=r"train.precision is 'fp32' but .* mixed_precision 'bf16'"):
        resolve_precision("fp32", {"ACCELERATE_MIXED_PRECISION": "bf16"})
    with pytest.raises(ConfigError, match="fp8"):
        resolve_precision("auto", {"ACCELERATE_MIXED_PRECISION": "fp8"})


def test_ignored_fsdp_plugin_keys_are_reported(monkeypatch, caplog):
    env = {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
           "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
           "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert ignored_launch_keys() == ["FSDP_CPU_RAM_EFFICIENT_LOADING", "FSDP_STATE_DICT_TYPE"]
    with caplog.at_level("WARNING"):
        backend = resolve_backend(load_config(REPO / "configs" / "smoke.yaml", []))
    assert backend.name == "fsdp2"
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "FSDP_STATE_DICT_TYPE" in warned and "FSDP_CPU_RAM_EFFICIENT_LOADING" in warned
    assert "FSDP_VERSION" not in warned


def test_run_records_the_resolved_backend_and_precision(tmp_path, monkeypatch):
    from twinbrain.train.trainer import Trainer
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    out = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["--run.out", str(out), "--train.max_steps", "4",
                                                         "--logging.wandb", "disabled", "--logging.progress", "off",
                                                         "--logging.flops", "false", "--train.eval_every", "1"])
    assert cfg.parallel.backend == "auto"
    Trainer(cfg).close()
    saved = load_config(out / "config.yaml", [])
    assert saved.parallel.backend == "single" and saved.parallel.zero_stage == 0
    env = json.loads((out / "environment.jsonl").read_text().splitlines()[-1])
    assert env["launch"] == {"backend": "single", "zero_stage": 0, "precision": "auto", "autocast_dtype": "float32"}
