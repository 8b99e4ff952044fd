"""Data-parallel efficiency (1 vs 2 CPU processes) and a communication-vs-compute estimate for GPUs.

    python bench/scaling.py                                   # measure on CPU + estimate
    python bench/scaling.py --estimate-only --device cuda     # estimate with a step time measured here

Measured part: the same config trained with ``twinbrain train`` (1 process) and with
``accelerate launch --config_file configs/accelerate/cpu.yaml --num_processes 2 launch/train.py``
(DDP over gloo), ``OMP_NUM_THREADS=1`` per process; throughput = median ``windows_per_s`` of the
``metrics.jsonl`` records after the first logging window (the trainer times steps only, not
evaluation or checkpoints).  ``train.batch_size`` is per process, so 2 processes do twice the
windows per step.  Efficiency = throughput(2) / (2 * throughput(1)).

Estimate: gradient bytes per step from the parameter count of the default model and the step time
of one device (measured here with ``--device``, or ``--step-time-s``), against nominal link
bandwidths.  See the Markdown it writes for the assumptions.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from twinbrain.rundir import RunDir

import common

NVLINK_GBS = 450.0      # H100 SXM NVLink 4: 18 links x 25 GB/s, per direction per GPU
IB_GBS = 50.0           # 400 Gb/s InfiniBand NDR, one NIC per GPU
UNITS = 5               # FSDP2 units of the default model: 4 STBlocks + the root
LATENCY_S = {"NVLink": 10e-6, "InfiniBand": 20e-6}   # per ring step (assumed)


def train_run(config: str, steps: int, procs: int, threads: int, a, out: Path) -> dict:
    """Train ``config`` with ``procs`` processes; median throughput after the first log window."""
    shutil.rmtree(out, ignore_errors=True)      # a leftover checkpoint would resume instead of train
    args = ["--config", config, "--run.out", str(out), "--train.max_steps", str(steps),
            "--train.eval_every", str(steps), "--train.checkpoint_every", str(steps), "--train.warmup_steps", "2",
            "--logging.log_every", str(a.log_every), "--logging.wandb", "disabled",
            "--logging.progress", "off", "--logging.flops", "false"]
    if procs == 1:
        cmd = [str(Path(sys.executable).with_name("twinbrain")), "train"] + args
    else:
        cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
               "configs/accelerate/cpu.yaml", "--num_processes", str(procs), "launch/train.py"] + args
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in RunDir(out).metrics.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("kind") == "train" and "windows_per_s" in r][1:]
    shown = " ".join(cmd).replace(str(Path(sys.executable).parent) + "/", "").replace(str(out), "RUN")
    return {"cmd": f"OMP_NUM_THREADS={threads} {shown}", "wall": wall,
            "wps": statistics.median(r["windows_per_s"] for r in recs),
            "step": statistics.median(r["step_time_s"] for r in recs),
            "data": statistics.median(r["data_share"] for r in recs)}


def measured(a, config: str, steps: int, trials: int, threads_reference: bool) -> str:
    """Markdown for one config: 1 vs 2 processes (trials alternate, median over trials)."""
    root = Path(tempfile.mkdtemp(prefix="twinbrain_scaling_"))
    runs = [("1 process, 1 thread", 1, 1), ("2 processes (DDP, gloo), 1 thread each", 2, 1)]
    if threads_reference:
        runs.append(("1 process, 2 threads (reference)", 1, 2))
    res: dict[str, list[dict]] = {label: [] for label, _, _ in runs}
    try:
        for trial in range(trials):
            for label, procs, threads in runs[:2] if trial else runs:   # the reference runs once
                print(f"{config}, trial {trial + 1}/{trials}: {label} ...", flush=True)
                res[label].append(train_run(config, steps, procs, threads, a, root / f"p{procs}t{threads}"))
                print(res[label][-1], flush=True)
    except RuntimeError as exc:
        print(exc, flush=True)
        return f"`{config}`: a training run failed: {str(exc).splitlines()[-1]}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = lambda label, key: statistics.median(r[key] for r in res[label])
    one, two = med(runs[0][0], "wps"), med(runs[1][0], "wps")
    rows = [[label, ", ".join(f"{r['wps']:.3g}" for r in res[label]), med(label, "wps"), med(label, "step"),
             med(label, "data"), med(label, "wall")] for label, _, _ in runs]
    return "\n".join([
        f"`{config}`, {steps} steps (warm-up 2), log every {a.log_every}, {trials} trial(s) (runs alternate; "
        f"the reference once); "
        f"train.batch_size is per process. Commands: `{res[runs[0][0]][0]['cmd']}` and "
        f"`{res[runs[1][0]][0]['cmd']}`.", "",
        common.md_table(["run", "windows/s per trial", "windows/s (median)", "s/step", "data share",
                         "wall s (incl. setup)"], rows), "",
        f"Efficiency (2 processes) = {two:.3g} / (2 x {one:.3g}) = **{two / (2 * one):.2f}** "
        f"(load average at the end {common.load_average()})."])


def default_model_params(subjects: int) -> int:
    from twinbrain.config import ModelConfig, TrainConfig
    from twinbrain.model import build_model, build_train_module
    model = build_model(ModelConfig(), subjects, subjects, 200, 63, 500)
    return sum(p.numel() for p in build_train_module(model, TrainConfig(), ModelConfig()).parameters())


def step_time(a) -> tuple[float, str]:
    if a.step_time_s:
        return a.step_time_s, a.step_time_note or "given with --step-time-s"
    device = common.setup_device(a)
    if device.type != "cuda":
        # docs/model.md: H100 80GB HBM3, 8 windows of 200 regions x 40 TRs + 32 channels, bf16, 4 blocks.
        return 0.128, ("H100 figure from docs/model.md (8 windows of 200 regions x 40 TRs, 32 EEG channels, "
                       "bf16): no GPU here")
    sh = common.shapes()
    step = common.full_model_step(sh, a.est_batch, device, torch.bfloat16)
    t = common.median(common.time_round_robin({"s": step}, device, repeats=5, warmup=2)["s"])
    return t, (f"measured here: {torch.cuda.get_device_name(device)}, {a.est_batch} windows of "
               f"{common.shape_text(sh)}, bf16, median of 5")


def estimate(a) -> str:
    p = default_model_params(a.subjects)
    grad = 4 * p                                   # fp32 gradients (parameters stay fp32 under autocast)
    t_step, note = step_time(a)
    rows = []
    for setup, world, link, bw in (("1 node x 8 GPUs", 8, "NVLink", NVLINK_GBS),
                                   ("2 nodes x 8 GPUs", 16, "InfiniBand", IB_GBS)):
        f = (world - 1) / world
        for strategy, sent, rounds in (("DDP: ring all-reduce of fp32 grads", 2 * f * grad, 2 * (world - 1)),
                                       ("FSDP2 / ZeRO-3 per block: 2 bf16 all-gathers + fp32 reduce-scatter",
                                        f * (2 * 2 * p + grad), 3 * UNITS * (world - 1))):
            t_comm = sent / (bw * 1e9) + rounds * LATENCY_S[link]
            rows.append([setup, strategy, sent / 2 ** 20, f"{bw:g} GB/s {link}", 1e3 * t_comm, 1e3 * t_step,
                         f"{100 * t_comm / t_step:.2g} %"])
    return "\n".join([
        f"Default model (hidden 128, 4 blocks, 200 fMRI + 63 EEG slots, {a.subjects} subjects and sessions, "
        f"uncertainty balancer): **{p:,} parameters** = {grad / 2 ** 20:.1f} MiB of fp32 gradients. "
        f"Compute per step on one GPU: {t_step * 1e3:.0f} ms ({note}).", "",
        common.md_table(["setup", "per step", "MiB sent per GPU", "link (assumed)", "comm ms", "compute ms",
                         "comm / compute"], rows), "",
        "Assumptions: data parallel with the per-GPU batch above, so compute per step does not change "
        "with the GPU count; ring algorithms, each GPU sends 2(W-1)/W x S for an all-reduce of S bytes and "
        "(W-1)/W x S for an all-gather or reduce-scatter; nominal per-direction bandwidth of the slowest "
        "link in the ring (NVLink 4 on H100 SXM 450 GB/s; 400 Gb/s InfiniBand = 50 GB/s per GPU, one NIC "
        "per GPU; a flat ring over 16 GPUs is bounded by the inter-node link, hierarchical all-reduce "
        "would be faster); plus an assumed latency of 10 us (NVLink) / 20 us (IB) per ring step; no "
        "overlap with backward (DDP does overlap its bucketed all-reduce with backward, so the real cost "
        "is lower; FSDP2 prefetches the next block's gather). FSDP2/ZeRO-3 send the same bytes as DDP here "
        "(bf16 gathers; twice as many with fp32), in 15x more collectives, and their gathers sit on the "
        "forward path. The model is small and activations dominate memory, so sharding parameters buys "
        "little: prefer DDP + activation checkpointing + bf16."])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_device_args(p)
    p.add_argument("--config", nargs="+", default=["configs/smoke.yaml"])
    p.add_argument("--steps", type=int, nargs="+", default=[40], help="per config (one value: all)")
    p.add_argument("--trials", type=int, nargs="+", default=[3], help="per config (one value: all)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--estimate-only", action="store_true", help="skip the CPU training runs")
    p.add_argument("--step-time-s", type=float, default=0, help="compute per step for the estimate")
    p.add_argument("--step-time-note", default="")
    p.add_argument("--est-batch", type=int, default=8, help="windows per GPU when measuring the step time")
    p.add_argument("--subjects", type=int, default=100, help="subject/session embedding rows")
    common.add_report_args(p)
    a = p.parse_args()
    common.setup_device(a)
    parts = []
    if not a.estimate_only:
        per = lambda xs, i: xs[i] if len(xs) > 1 else xs[0]
        parts += ["Measured: data-parallel throughput on CPU. The machine has 2 cores shared with other jobs: "
                  "2 processes compete with them, so read the efficiency as a check that DDP adds little "
                  "overhead, not as a scaling figure.", ""]
        for i, config in enumerate(a.config):
            parts += [measured(a, config, per(a.steps, i), per(a.trials, i), threads_reference=i == 0), ""]
    parts += ["Estimate: communication vs compute per step for 8 GPUs and 2 x 8 GPUs", "", estimate(a)]
    common.report(a, "Data-parallel scaling", "\n".join(parts), common.setup_device(a))


if __name__ == "__main__":
    main()
