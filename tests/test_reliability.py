"""Reliability: damaged checkpoints, divergence, the run-directory lock, one record per step after a
resume, one-line refusals of bad input, the DeepSpeed extension cache.

In-process trainers on the tiny synthetic cohort of ``tests/test_trainer.py``; the multi-process fault
cases (kill -9 inside a DCP save, a rank raising) are at the end and marked slow.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_trainer import synth_cfg, synth_data
from twinbrain import cli
from twinbrain.config import ConfigError, load_config
from twinbrain.train.checkpoint import complete_checkpoints
from twinbrain.train.extensions import StaleExtensionLock, check_stale_locks, extension_dir, watch_build_locks
from twinbrain.train.runlock import RunDirLocked, RunLock
from twinbrain.train.telemetry import drop_records_after
from twinbrain.train.trainer import DivergenceError, Trainer

REPO = Path(__file__).resolve().parents[1]
FAST = ["--train.checkpoint_every", "2", "--train.eval_every", "2", "--logging.log_every", "1",
        "--train.keep_checkpoints", "3"]


def trainer(out: Path, *extra: str) -> Trainer:
    cfg = synth_cfg(out, *FAST, *extra)
    return Trainer(cfg, data=synth_data(cfg))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ---------------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    tr = trainer(out, "--train.max_steps", "6")
    tr.train(until=4)
    tr.close()
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000002", "step-00000004"]
    return out


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _zero(p: Path) -> None:
    p.write_bytes(bytes(p.stat().st_size))


DAMAGE = {
    "dcp-shard": lambda c: _truncate(next((c / "dcp").glob("*.distcp"))),
    "rank-pt": lambda c: _zero(c / "rank-0.pt"),
    "meta-missing": lambda c: (c / "meta.json").unlink(),
    "trainer-empty": lambda c: (c / "trainer.pt").write_bytes(b""),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_skipped_and_kept(two_checkpoints, tmp_path, damage, caplog):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    newest = out / "checkpoints" / "step-00000004"
    DAMAGE[damage](newest)
    with caplog.at_level(logging.WARNING, logger="twinbrain.train.checkpoint"):
        tr = trainer(out, "--train.max_steps", "6")
    assert tr.step == 2 and tr.resume_from.name == "step-00000002"
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 1 and str(newest) in warned[0]
    kept = out / "checkpoints" / "step-00000004.damaged"
    assert kept.is_dir()
    tr.train()
    tr.close()
    # The retrained step 4 is a new checkpoint beside the damaged one, which survives retention.
    assert kept.is_dir() and (out / "checkpoints" / "step-00000006" / "COMPLETE").is_file()
    steps = [r["step"] for r in records(out / "metrics.jsonl")]
    assert steps == list(range(1, 7))


def test_no_intact_checkpoint_starts_fresh(two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    for c in complete_checkpoints(out / "checkpoints"):
        (c / "trainer.pt").write_bytes(b"")
    tr = trainer(out, "--train.max_steps", "6")
    assert tr.step == 0 and tr.resume_from is None
    tr.close()
    assert len(list((out / "checkpoints").glob("*.damaged"))) == 2


# ---------------------------------------------------------------- divergence
def test_divergence_stops_nonzero_and_keeps_best_finite(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--config", "configs/smoke.yaml", "--run.out", str(out), "--train.lr", "1e6",
                     "--logging.wandb", "disabled", "--logging.progress", "off", "--logging.flops", "false"])
    err = capsys.readouterr().err
    assert code == 1
    assert "training diverged" in err and "Traceback" not in err
    final = torch.load(out / "final" / "model.pt", weights_only=False)
    assert "consecutive" in final["diverged"] and (out / "final" / "DIVERGED").is_file()
    best = out / "best" / "model.pt"
    if best.is_file():       # only from a finite, improved validation
        b = torch.load(best, weights_only=False)
        assert "diverged" not in b and math.isfinite(b["metrics"]["val/loss"])
        assert all(torch.isfinite(v).all() for v in b["model"].values())
    steps = [r["step"] for r in records(out / "metrics.jsonl")]
    assert steps and steps[-1] < 20           # stopped early, with a record of the last step


def test_divergence_limit_counts_consecutive_skips(tmp_path):
    tr = trainer(tmp_path / "run", "--train.max_steps", "6", "--train.max_skipped_consecutive", "2")
    tr.skipped_run = tr.skipped = 2
    assert "2 consecutive" in tr._divergence()
    tr.skipped_run = 1
    assert tr._divergence() is None
    tr.close()


def test_unguarded_divergence_never_becomes_best(tmp_path):
    # Guards off: the run ends normally with non-finite validations; final/ is marked, best/ not made.
    out = tmp_path / "run"
    tr = trainer(out, "--train.max_steps", "6", "--train.max_skipped_consecutive", "0",
                 "--train.max_skipped_fraction", "1", "--train.lr", "1e30")
    tr.train()
    tr.close()
    evals = records(out / "eval_metrics.jsonl")
    assert evals[0]["step"] == 0 and math.isfinite(evals[0]["val/loss"])      # the warm-started linear model
    assert evals[1:] and all(r["val/loss"] is None for r in evals[1:])
    assert "final validation loss is" in torch.load(out / "final" / "model.pt", weights_only=False)["diverged"]
    # best/ is the finite warm start, never a diverged step.
    assert torch.load(out / "best" / "model.pt", weights_only=False)["step"] == 0


# ---------------------------------------------------------------- run-directory lock
def _hold_lock(run: Path) -> subprocess.Popen:
    code = ("import sys, time; from twinbrain.train.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_launch_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        code = cli.main(["train", "--config", "configs/smoke.yaml", "--run.out", str(run),
                         "--logging.wandb", "disabled"])
        err = capsys.readouterr().err
        assert code == 2 and f"pid {holder.pid} on host" in err and "Traceback" not in err
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its record outlives it, and the next run reports and takes over the lock.
    lock = RunLock(run)
    lock.acquire()
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (run / ".lock").read_text() == ""


def test_stale_lock_is_reported(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "then"}))
    with caplog.at_level(logging.WARNING, logger="twinbrain.train.runlock"):
        lock = RunLock(run)
        lock.acquire()
    lock.release()
    assert any(f"pid {dead.pid}" in r.getMessage() and "no longer running" in r.getMessage()
               for r in caplog.records)


def test_lock_is_shared_within_one_process(tmp_path):
    a, b = RunLock(tmp_path), RunLock(tmp_path)
    a.acquire()
    b.acquire()
    a.release()
    # Still held by b: another process is refused.
    probe = subprocess.run([sys.executable, "-c", "import sys; from twinbrain.train.runlock import RunLock; "
                            "RunLock(sys.argv[1]).acquire()", str(tmp_path)], cwd=REPO, capture_output=True,
                           text=True)
    assert probe.returncode != 0 and "RunDirLocked" in probe.stderr
    b.release()


# ---------------------------------------------------------------- one record per step
def test_resume_after_a_lost_checkpoint_keeps_one_record_per_step(tmp_path):
    out = tmp_path / "run"
    tr = trainer(out, "--train.max_steps", "8", "--train.checkpoint_every", "4")
    tr.train(until=6)              # logs and evaluates steps 1-6, checkpoints 4 and 6
    tr.close()
    # As if killed after step 6 was logged but before its checkpoint was written.
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 7, "lo')         # a line torn by the kill
    tr = trainer(out, "--train.max_steps", "8", "--train.checkpoint_every", "4")
    assert tr.step == 4
    tr.train()
    tr.close()
    assert [r["step"] for r in records(out / "metrics.jsonl")] == list(range(1, 9))
    assert [r["step"] for r in records(out / "eval_metrics.jsonl")] == [0, 2, 4, 6, 8]   # 0: the warm start


def test_drop_records_after_is_a_noop_without_late_records(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n')
    before = log.stat().st_mtime_ns
    assert drop_records_after(log, 2) == 0 and log.stat().st_mtime_ns == before
    assert drop_records_after(log, 1) == 1 and log.read_text() == '{"step": 1}\n'


# ---------------------------------------------------------------- refusals: one line, exit 2, fast
def _refused(capsys, *argv: str) -> str:
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("value", ["inf", "nan", "-.inf", ".nan"])
def test_nonfinite_float_is_refused(capsys, value):
    line = _refused(capsys, "config", "--config", "configs/smoke.yaml", "--train.lr", value)
    assert "train.lr" in line and "finite" in line
    with pytest.raises(ConfigError, match="sim.noise"):
        load_config("configs/smoke.yaml", ["--sim.noise", value])


def test_unwritable_run_dir_and_missing_paths_are_refused_before_setup(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = _refused(capsys, "train", "--config", "configs/smoke.yaml", "--run.out", str(blocker / "run"))
    assert "run.out" in line and "not a writable directory" in line
    line = _refused(capsys, "train", "--config", "configs/smoke.yaml", "--run.out", str(tmp_path / "r"),
                    "--graph.structural", str(tmp_path / "sc.npy"))
    assert "graph.structural" in line and "sc.npy" in line
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_incompatible_run_dir_is_refused_before_data_setup(two_checkpoints, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    meta = out / "checkpoints" / "step-00000004" / "meta.json"
    for c in complete_checkpoints(out / "checkpoints"):     # as if saved by 2 processes
        m = json.loads((c / "meta.json").read_text())
        (c / "meta.json").write_text(json.dumps({**m, "world_size": 2}))
        (c / "MANIFEST.json").unlink()                      # unverified (pre-manifest) checkpoints
    import twinbrain.train.trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "DataModule", None)     # any data setup would fail loudly
    cfg = synth_cfg(out, *FAST, "--train.max_steps", "6")
    with pytest.raises(ConfigError, match="saved with 2 processes"):
        Trainer(cfg)
    assert meta.is_file()


def test_corrupt_export_given_to_evaluate(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\0" * 100)
    line = _refused(capsys, "evaluate", "--checkpoint", str(bad))
    assert str(bad) in line and "corrupt" in line
    line = _refused(capsys, "evaluate", "--checkpoint", str(tmp_path / "none.pt"))
    assert "none.pt" in line


def test_launch_script_refuses_in_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TWINBRAIN_DEBUG", None)
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/smoke.yaml",
                           "--run.out", str(tmp_path / "r"), "--train.lr", "inf"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: train.lr: expected a finite number, got inf"]
    proc = subprocess.run([sys.executable, "launch/train.py", "--debug", "--config", "configs/smoke.yaml",
                           "--train.lr", "inf"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


# ---------------------------------------------------------------- DeepSpeed extension cache
def test_extension_cache_is_per_environment(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert extension_dir() == Path(sys.prefix) / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    assert extension_dir() == Path("/somewhere/else")


def test_stale_build_lock_is_refused_with_the_fix(tmp_path):
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    check_stale_locks(tmp_path)                              # fresh: a build may be running
    with pytest.raises(StaleExtensionLock, match=f"rm {lock}"):
        check_stale_locks(tmp_path, now=time.time() + 3600)


def test_a_build_lock_that_goes_stale_while_waiting_is_reported(tmp_path):
    import threading
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    seen, told = [], threading.Event()

    def on_stale(msg):
        seen.append(msg)
        told.set()

    with watch_build_locks(tmp_path, max_age_s=3600, interval_s=0.01, on_stale=on_stale):
        assert not told.wait(0.1)                            # fresh lock: a build may be running
        os.utime(lock, (time.time() - 7200, time.time() - 7200))   # the builder died long ago
        assert told.wait(30)
    assert len(seen) == 1 and f"rm {lock}" in seen[0]


# ---------------------------------------------------------------- stale store entry
def test_store_entry_of_a_failed_re_prepare_is_announced(tmp_path):
    from tests.bids_synth import make_config, make_recording, write_dataset
    from twinbrain.data.prepare import PrepareError, load_prepared_cohort, prepare

    root = write_dataset(tmp_path / "bids", [make_recording("01", n_vols=12),
                                             make_recording("02", n_vols=12, seed=1)])
    cfg = make_config(root, tmp_path / "store")
    prepare(cfg, progress=False)
    tsv = root / "sub-02/ses-1/func/sub-02_ses-1_task-rest_run-1_bold.tsv"
    tsv.write_text("not a number\n")                           # damaged since the first prepare
    with pytest.raises(PrepareError):
        prepare(cfg, progress=False)
    offline = make_config(root, cfg.data.store_dir)
    offline.data.source = "store"
    with pytest.warns(UserWarning, match="last prepare of sub-02_ses-1_task-rest_run-1 failed"):
        cohort = load_prepared_cohort(offline)
    assert len(cohort.recordings) == 2
    tsv.unlink()
    write_dataset(tmp_path / "bids", [make_recording("01", n_vols=12), make_recording("02", n_vols=12, seed=1)])
    prepare(cfg, progress=False)                               # fixed: the record of the failure goes
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_prepared_cohort(offline)


# ---------------------------------------------------------------- multi-process faults (2 gloo processes)
def _launch2_fault(out: Path, fault: str, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    from tests.test_distributed import ACCELERATE, COMMON, _env
    env = _env()
    if fault:
        env["TWINBRAIN_TEST_FAULT"] = fault
    script = "tests/fault_train.py" if fault else "launch/train.py"
    return subprocess.run([str(ACCELERATE), "launch", "--config_file", "configs/accelerate/cpu.yaml",
                           "--num_processes", "2", script, *COMMON, "--run.out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_kill_during_dcp_shard_write_then_damaged_rank_file(tmp_path):
    out = tmp_path / "run"
    killed = _launch2_fault(out, "kill-in-save:6:1", "--train.max_steps", "8")
    assert killed.returncode != 0
    assert (out / "checkpoints" / "step-00000006.partial").is_dir()
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000003"]
    resumed = _launch2_fault(out, "", "--train.max_steps", "8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-00000003 at step 3" in resumed.stderr
    assert [r["step"] for r in records(out / "metrics.jsonl")] == list(range(1, 9))
    assert [r["step"] for r in records(out / "eval_metrics.jsonl")] == [0, 3, 6, 8]   # 0: the warm start
    # A zeroed rank-1.pt in the newest checkpoint: both ranks fall back to step 6 together.
    newest = out / "checkpoints" / "step-00000008"
    _zero(newest / "rank-1.pt")
    again = _launch2_fault(out, "", "--train.max_steps", "9")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"checkpoint {newest} is damaged: rank-1.pt does not match its SHA-256" in again.stderr
    assert "step-00000006 at step 6" in again.stderr
    assert (out / "checkpoints" / "step-00000008.damaged").is_dir()
    assert [r["step"] for r in records(out / "metrics.jsonl")] == list(range(1, 10))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [["--parallel.backend", "fsdp2"],
                                     ["--parallel.backend", "deepspeed", "--parallel.zero_stage", "2"]],
                         ids=["fsdp2", "zero2"])
def test_a_rank_raising_ends_the_job(tmp_path, backend):
    out = tmp_path / "run"
    proc = _launch2_fault(out, "raise:2:1", "--train.max_steps", "4", *backend, timeout=600)
    assert proc.returncode != 0
    assert "injected fault on rank 1 at step 2" in proc.stderr
    assert not complete_checkpoints(out / "checkpoints")
    lock = RunLock(out)                # the dead job's lock is free
    lock.acquire()
    lock.release()


def test_a_refused_trainer_releases_the_lock(two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    with pytest.raises(ConfigError, match="train.lr"):
        trainer(out, "--train.max_steps", "6", "--train.lr", "0.5")
    assert (out / ".lock").read_text() == ""          # released, not left for the next run to call stale
