"""Telemetry: metrics.jsonl, offline wandb, resume, FLOPs, progress, profiling."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twinbrain.config import LoggingConfig
from twinbrain.train.meters import count_flops, peak_tflops, reduce_scalars
from twinbrain.train.telemetry import Telemetry, summary_table
from twinbrain.train.tracker import STEP_METRIC, resolve_wandb_mode, wandb_name

REQUIRED = {"step", "loss", "windows_per_s", "node_steps_per_s", "rss_gib"}
WANDB_INTERNAL = {"_runtime", "_step", "_timestamp", "_wandb"}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No key, no network: wandb must go offline by itself."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    yield
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)  # don't leak Accelerate's singleton to other tests


def make(run_dir: Path, max_steps: int = 4, resume: str | None = None, start: int = 0, **logging) -> Telemetry:
    cfg = LoggingConfig(**{"log_every": 2, "wandb": "auto", "progress": "off", **logging})
    return Telemetry(cfg, run_dir, is_main=True, world_size=1, device=torch.device("cpu"),
                     config_dict={"train": {"lr": 1e-3}}, run_name="t", resume_run_id=resume,
                     max_steps=max_steps, backend="single", start_step=start)


def train(tel: Telemetry, first: int, last: int) -> None:
    for step in range(first, last + 1):
        tel.step_begin()
        tel.data_loaded()
        torch.randn(64, 64) @ torch.randn(64, 64)
        tel.step_end(step, n_windows=8, n_node_steps=8 * 112 * 40)
        if tel.should_flush(step):
            tel.log(step, {"loss": 1.0 / step, "loss/recon_fmri": 0.5 / step, "lr/base": 1e-3, "grad_norm": 0.3})
            tel.flush(step)


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    """Records of one kind; metrics.jsonl holds only training log steps (the run-directory contract)."""
    name = {"train": "metrics.jsonl", "eval": "eval_metrics.jsonl", "env": "environment.jsonl"}[kind]
    lines = (run_dir / name).read_text().splitlines()
    recs = list(map(json.loads, lines))
    assert all(r.get("kind") == kind for r in recs), f"{name} mixes record kinds"
    return recs


def inspect(run_dir: Path) -> list[dict]:
    """Every offline run under run_dir/wandb, read back with `wandb leet inspect` (no network)."""
    wandb_bin = Path(sys.executable).with_name("wandb")
    out = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        res = subprocess.run([str(wandb_bin), "leet", "inspect", "--summary", "--json", str(d)],
                             capture_output=True, text=True, timeout=60, check=True)
        out.append(json.loads(res.stdout))
    return out


def test_offline_wandb_and_jsonl_have_throughput_and_memory_keys(tmp_path, offline):
    run = tmp_path / "run"
    tel = make(run)
    assert tel.wandb is not None and tel.wandb.mode == "offline"
    tel.set_step_flops(count_flops(lambda: torch.randn(8, 16, requires_grad=True).sum().backward()) + 1000)
    train(tel, 1, 4)
    tel.log_eval(4, {"r2_fmri": 0.25, "val/skill_fmri": 0.1})
    tel.close(print_summary=False)

    recs = records(run)
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        assert REQUIRED <= set(r), set(r)
        assert r["windows_per_s"] > 0 and r["node_steps_per_s"] == pytest.approx(r["windows_per_s"] * 112 * 40)
        assert 0.0 <= r["data_share"] <= 1.0
        assert r["tflops_per_s"] > 0 and r["mfu"] is None  # CPU: no peak, no invented MFU
    (ev,) = records(run, "eval")
    assert ev["step"] == 4 and ev["val/r2_fmri"] == 0.25 and ev["val/skill_fmri"] == 0.1
    (env,) = records(run, "env")
    assert env["run_id"] == tel.run_id and env["world_size"] == 1

    (wb,) = inspect(run)
    assert wb["run_id"] == tel.run_id and wb["state"] == "finished"
    summary = wb["summary"]
    logged = {k for k in summary if k not in WANDB_INTERNAL}
    wanted = REQUIRED - {"step", "time", "kind"} | {"rss_peak_gib", "step_time_s", "data_share", "tflops_per_s"}
    assert {wandb_name(k) for k in wanted} | {"val/r2_fmri", STEP_METRIC} <= logged
    # wandb got the same values as metrics.jsonl, under their groups, and no duplicate step/time metrics
    sent = {k for k, v in {**recs[-1], **ev}.items() if v is not None and k not in ("step", "time", "kind")}
    assert logged == {wandb_name(k) for k in sent} | {STEP_METRIC}
    assert all(k.split("/")[0] in ("train", "val", "perf", "mem", "trainer") for k in logged), logged
    assert summary["perf/windows_per_s"] == pytest.approx(recs[-1]["windows_per_s"])
    assert summary["train/loss"]["min"] == pytest.approx(0.25) and summary["val/r2_fmri"]["max"] == 0.25
    assert summary[STEP_METRIC] == 4
    assert wb["config"]["train"]["lr"] == 1e-3
    assert wb["config"]["env"]["torch"] == torch.__version__


def test_resume_continues_the_same_run_id(tmp_path, offline):
    run = tmp_path / "run"
    first = make(run, max_steps=4)
    run_id = first.run_id
    train(first, 1, 2)
    first.close(print_summary=False)

    second = make(run, max_steps=4, resume=run_id, start=2)
    assert second.run_id == run_id
    train(second, 3, 4)
    second.close(print_summary=False)

    assert [r["step"] for r in records(run)] == [2, 4]
    runs = inspect(run)
    assert len(runs) == 2 and {r["run_id"] for r in runs} == {run_id}
    # the resumed half continues on the trainer's step axis, not on wandb's own counter
    assert [r["summary"][STEP_METRIC] for r in runs] == [2, 4]


def test_disabled_writes_no_wandb_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # even with a key, 'disabled' never touches wandb
    run = tmp_path / "run"
    tel = make(run, wandb="disabled", resume="abc12345")
    assert tel.wandb is None and tel.run_id == "abc12345"
    train(tel, 1, 4)
    tel.close(print_summary=False)
    assert not (run / "wandb").exists()
    assert REQUIRED <= set(records(run)[-1])
    fresh = make(tmp_path / "run2", wandb="disabled")
    assert len(fresh.run_id) == 8
    fresh.close(print_summary=False)


def test_wandb_mode_resolution(tmp_path):
    no_key = {"NETRC": str(tmp_path / "none")}
    assert resolve_wandb_mode("auto", no_key) == "offline"
    assert resolve_wandb_mode("auto", {**no_key, "WANDB_API_KEY": "k"}) == "online"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secretkey\n")
    assert resolve_wandb_mode("auto", {"NETRC": str(netrc)}) == "online"
    assert resolve_wandb_mode("auto", {"NETRC": str(netrc), "WANDB_MODE": "offline"}) == "offline"
    assert resolve_wandb_mode("disabled", {"WANDB_API_KEY": "k"}) is None
    assert resolve_wandb_mode("online", no_key) == "online"


def test_progress_lines_prints_one_line_per_flush(tmp_path, capsys):
    tel = make(tmp_path / "run", max_steps=6, wandb="disabled", progress="lines")
    train(tel, 1, 6)
    tel.log_eval(6, {"loss": 0.5})
    tel.close(print_summary=True)
    out = capsys.readouterr().out.splitlines()
    steps = [ln for ln in out if re.match(r"step +\d+/6 \|", ln)]
    assert len(steps) == 3, out
    assert all("win/s" in ln and "eta" in ln for ln in steps)
    assert any(ln.startswith("eval step 6") and "val/loss" in ln for ln in out)
    assert any(ln.startswith("windows_per_s") for ln in out)  # the final summary table


def test_progress_off_prints_nothing(tmp_path, capsys):
    tel = make(tmp_path / "run", wandb="disabled", progress="off")
    train(tel, 1, 4)
    tel.close(print_summary=True)
    assert capsys.readouterr().out == ""


def test_count_flops_matches_analytic_linear_count():
    torch.manual_seed(0)
    B, K, N = 16, 32, 24
    lin = torch.nn.Linear(K, N)
    x = torch.randn(B, K)
    # weight gradient only (input needs none): forward 2BKN + dW 2BKN
    assert count_flops(lambda: lin(x).sum().backward()) == 4 * B * K * N
    xg = x.clone().requires_grad_(True)
    # plus the input gradient: 2BKN more
    assert count_flops(lambda: lin(xg).sum().backward()) == 6 * B * K * N

    mlp = torch.nn.Sequential(torch.nn.Linear(K, 64), torch.nn.GELU(), torch.nn.Linear(64, N))
    step = lambda: mlp(x).square().mean().backward()  # noqa: E731
    first, second = count_flops(step), count_flops(step)
    assert first > 0 and first == second
    assert first == 4 * B * K * 64 + 6 * B * 64 * N  # layer 1: no dX; layer 2: fwd + dW + dX


def test_peak_table_is_honest():
    assert peak_tflops("NVIDIA H100 80GB HBM3")[0] == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe")[0] == pytest.approx(756.0)
    assert peak_tflops("NVIDIA H200")[0] == pytest.approx(989.4)
    assert peak_tflops("NVIDIA A100-SXM4-80GB")[0] == pytest.approx(312.0)
    assert peak_tflops("NVIDIA L40S")[1] == "L40S" and peak_tflops("NVIDIA L4")[1] == "L4"
    assert peak_tflops("NVIDIA L40")[0] is None
    peak, label = peak_tflops("cpu")
    assert peak is None and label.startswith("unknown device")


def test_reduce_scalars_without_process_group():
    out = reduce_scalars({"b": torch.tensor(2.0), "a": 1})
    assert out == {"a": 1.0, "b": 2.0}
    with pytest.raises(ValueError, match="op"):
        reduce_scalars({"a": 1.0}, op="median")


def test_profiler_trace_and_cpu_oom_noop(tmp_path):
    run = tmp_path / "run"
    tel = make(run, max_steps=6, wandb="disabled", profile_steps=2)
    for step in range(1, 7):
        with tel.maybe_profile(step):
            torch.randn(32, 32) @ torch.randn(32, 32)
    assert tel.on_oom() is None  # CPU: no snapshot, no error
    tel.close(print_summary=False)
    traces = list((run / "profile").glob("trace_rank0_step*.json"))
    assert len(traces) == 1 and json.loads(traces[0].read_text())["traceEvents"]


def test_summary_table_is_aligned():
    text = summary_table({"step": 10, "loss": 0.12345, "loss/recon": 0.1, "windows_per_s": 12.5, "kind": "train"},
                         {"step": 10, "kind": "eval", "val/r2": 0.3})
    rows = text.splitlines()[1:-1]
    assert [r.split()[0] for r in rows] == ["step", "loss", "loss/recon", "windows_per_s", "val/r2"]
    assert len({len(r) for r in rows}) == 1
    assert summary_table(None, None) == "(no metrics recorded)"


def _dist_worker(rank: int, world: int, port: int, run_dir: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    cfg = LoggingConfig(log_every=2, wandb="disabled", progress="off")
    tel = Telemetry(cfg, Path(run_dir), is_main=rank == 0, world_size=world, device=torch.device("cpu"),
                    config_dict={}, run_name="d", resume_run_id=None, max_steps=2, backend="ddp")
    red = reduce_scalars({"loss": float(rank + 1)})
    for step in (1, 2):
        tel.step_begin()
        tel.data_loaded()
        tel.step_end(step, n_windows=rank + 1, n_node_steps=10 * (rank + 1))
    tel.log(2, red)
    rec = tel.flush(2)
    tel.close(print_summary=False)
    queue.put((rank, tel.run_id, red["loss"], rec))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_reduce_counts_and_share_run_id(tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r[0], r[1:]) for r in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=30)
    assert results[0][0] == results[1][0]              # one run id on every rank
    assert results[0][1] == results[1][1] == 1.5       # mean of 1 and 2
    rec, other = results[0][2], results[1][2]
    assert other == {}                                  # only the main rank reports
    # windows: rank0 1+1, rank1 2+2 -> 6 in total over the window
    assert rec["node_steps_per_s"] == pytest.approx(10 * rec["windows_per_s"])
    assert rec["windows_per_s_per_device"] == pytest.approx(rec["windows_per_s"] / 2)
    assert rec["loss"] == 1.5
