"""Whole TwinBrain train step at the reference's shapes, on CPU, against the peer anchor; code trees side by side.

    OMP_NUM_THREADS=1 python bench/train_step_reference.py                        # this tree only
    git archive main | tar -x -C /tmp/tb_main                                     # "before" tree
    OMP_NUM_THREADS=1 python bench/train_step_reference.py --tree before=/tmp/tb_main --tree after=.

Shapes (the TwinBrain V5 reference's default window, docs/PERFORMANCE.md "peer anchor"): fMRI 190 regions
x 50 TRs, EEG 63 channels x 250 latent steps (25 000 samples at stride 100), hidden 128, 4 blocks, 1 window
per step, fp32 (``--precision bf16``: the forward under bf16 autocast, as ``train.precision: bf16``), 1 torch thread.  A step = TrainModule forward (model + losses + uncertainty balancer),
backward, gradient clipping, AdamW, zero_grad: what the trainer does per optimizer step.

Every measurement runs in a fresh subprocess (``--worker``) whose ``sys.path`` starts at the tree under test,
so the before and after trees are timed by the same script, alternated (before, after, before, after ...).
Per worker: ``--steps`` timed steps after 1 warm-up.  Reported:

* **CPU-s per window** = ``time.process_time`` per step / windows (median over steps and workers);
* **peak RSS** = the process's VmHWM after the steps (absolute) and its growth above the RSS once the model,
  optimizer and batch exist, before the first (warm-up) step (high-water mark reset through
  ``/proc/self/clear_refs``), i.e. what the steps themselves add, like the reference's "+3.25 GB";
* **matmul share**: FLOPs of one step counted by ``FlopCounterMode`` (mm/addmm/bmm/conv/attention) and
  the CPU time of those kernels in a ``torch.profiler`` trace of one step; their own rate and the whole
  step's matmul-equivalent rate are compared to a 2048^3 ``torch.mm`` in the step's dtype measured in the same worker.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()

# Reference (peer anchor): TwinBrain V5 run unmodified on this 2-core machine at its default window
# (issue 18): 22.1 s wall per one-window step with its activation checkpointing, +3.25 GB RSS, at 2 threads;
# 38 CPU-s per one-window step at 1 thread.
REFERENCE_CPU_S = 38.0
REFERENCE_RSS_GB = 3.25

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
              "aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward",
              "aten::convolution_backward", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _window(a, seed: int):
    """One synthetic window with the reference's shapes (random signals and k-NN FC graphs)."""
    import torch
    from torch_geometric.data import HeteroData
    gen = torch.Generator().manual_seed(seed)
    d = HeteroData()
    spt = a.steps_per_tr * a.eeg_stride
    for m, n, t in (("fmri", a.n_fmri, a.t_f), ("eeg", a.n_eeg, a.t_f * spt)):
        x = torch.randn(n, t, 1, generator=gen)
        d[m].x, d[m].y = x, x.clone()
        d[m].mask, d[m].node_id, d[m].pos = torch.ones(n, dtype=torch.bool), torch.arange(n), torch.randn(n, 3)
    for rel, (ns, nd, k) in {("fmri", "fc", "fmri"): (a.n_fmri, a.n_fmri, 15),
                             ("eeg", "fc", "eeg"): (a.n_eeg, a.n_eeg, 10),
                             ("eeg", "to", "fmri"): (a.n_eeg, a.n_fmri, 10)}.items():
        scores = torch.rand(nd, ns, generator=gen)
        if rel[0] == rel[2]:
            scores.fill_diagonal_(-1.0)
        src = scores.topk(k, dim=1).indices
        dst = torch.arange(nd).unsqueeze(1).expand_as(src)
        d[rel].edge_index = torch.stack([src.reshape(-1), dst.reshape(-1)])
        d[rel].edge_weight = 0.1 + 0.9 * torch.rand(d[rel].edge_index.shape[1], generator=gen)
    d.subject, d.session = torch.tensor([seed % 4]), torch.tensor([seed % 4])
    return d


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def worker(a) -> dict:
    """Build the step from the tree at ``a.worker`` and measure it; returns one JSON-able dict."""
    sys.path.insert(0, str(Path(a.worker).resolve()))
    import torch
    torch.set_num_threads(1)
    from torch.utils.flop_counter import FlopCounterMode
    from torch_geometric.data import Batch
    import twinbrain
    from twinbrain.config import ModelConfig, TrainConfig
    from twinbrain.model import build_model
    from twinbrain.train.optim import build_optimizer, param_groups
    from twinbrain.train.parallel import apply_activation_checkpointing

    assert Path(twinbrain.__file__).resolve().is_relative_to(Path(a.worker).resolve()), twinbrain.__file__
    from common import freeze_fixed, host_memory_as_trainer, train_module   # after twinbrain (this tree)
    torch.manual_seed(0)
    overrides = {k: _parse_value(v) for k, v in (s.split("=", 1) for s in a.set)}
    mc = ModelConfig(hidden=a.hidden, blocks=a.blocks, eeg_patch=a.eeg_stride, eeg_stride=a.eeg_stride,
                     **overrides)
    tc = TrainConfig(balancer="uncertainty")
    host_memory_as_trainer("cpu")
    model = build_model(mc, 4, 4, a.n_fmri, a.n_eeg, a.steps_per_tr * a.eeg_stride)
    freeze_fixed(model, tc)
    if a.ckpt:
        apply_activation_checkpointing(model.blocks, "full", 1)
    module = train_module(model, tc, mc).train()
    opt = build_optimizer(param_groups(model, tc, extra=module.balancer), tc, torch.device("cpu"))
    params = [p for g in opt.param_groups for p in g["params"]]
    batch = Batch.from_data_list([_window(a, s) for s in range(a.windows)])
    counts = module.counts(batch)

    dtype = {"fp32": None, "bf16": torch.bfloat16}[a.dtype]

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):   # as the trainer's backends do
            loss, _ = module(batch, counts, 1.0, 1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with open("/proc/self/clear_refs", "w") as f:             # reset the high-water mark to the RSS now
        f.write("5")
    rss0 = _status_kib("VmRSS")                                # model, optimizer and batch built
    t0 = time.process_time()
    step()                                                   # warm-up (allocations, lazy inits, compile)
    warm = time.process_time() - t0
    cpu = []
    for _ in range(a.steps):
        t0 = time.process_time()
        step()
        cpu.append(time.process_time() - t0)
    hwm = _status_kib("VmHWM")
    res = {"cpu_s": cpu, "warmup_cpu_s": warm, "rss_hwm_mib": hwm / 1024, "rss_growth_mib": (hwm - rss0) / 1024,
           "rss_before_mib": rss0 / 1024, "params": sum(p.numel() for p in model.parameters())}
    if a.matmul:
        with FlopCounterMode(display=False) as fc:
            step()
        res["flops"] = fc.get_total_flops()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.process_time()
            step()
            res["profiled_cpu_s"] = time.process_time() - t0
        ev = prof.key_averages()
        total_self = sum(e.self_cpu_time_total for e in ev)
        mm = sum(e.self_cpu_time_total for e in ev if e.key in MATMUL_OPS)
        res["matmul_self_share"] = mm / total_self
        top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]
        res["top_ops"] = [[e.key, round(e.self_cpu_time_total / total_self, 3)] for e in top]
        x = torch.randn(2048, 2048, dtype=dtype or torch.float32)      # the GEMM rate of the step's dtype
        y = torch.randn(2048, 2048, dtype=dtype or torch.float32)
        torch.mm(x, y)
        rates = []
        for _ in range(3):
            t0 = time.process_time()
            torch.mm(x, y)
            rates.append(2 * 2048 ** 3 / (time.process_time() - t0))
        res["gemm_flops_per_cpu_s"] = statistics.median(rates)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", default=[],
                   help="NAME=DIR: a TwinBrain source tree to time (repeatable; default: this tree as 'this')")
    p.add_argument("--set", action="append", default=[],
                   help="NAME:KEY=VALUE model config override for one tree (e.g. after:attention_window=32); "
                        "KEY=VALUE for every tree")
    p.add_argument("--n-fmri", type=int, default=190)
    p.add_argument("--n-eeg", type=int, default=63)
    p.add_argument("--t-f", type=int, default=50, help="fMRI TRs per window")
    p.add_argument("--steps-per-tr", type=int, default=5, help="EEG latent steps per TR (250 in 50 TRs)")
    p.add_argument("--eeg-stride", type=int, default=100, help="EEG samples per latent step")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--checkpointing", type=int, nargs="+", default=[0, 1],
                   help="activation checkpointing per block off (0) / on (1); both by default")
    p.add_argument("--steps", type=int, default=2, help="timed steps per worker (after 1 warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="workers per (tree, checkpointing), alternated")
    p.add_argument("--out-json", default="", help="also write every worker's result here")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    # The worker's own switch: a list-valued --checkpointing ([0] or [1]) would always be truthy there.
    p.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   help="forward under bf16 autocast (as train.precision: bf16) as well as / instead of fp32")
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return

    trees = dict(t.split("=", 1) for t in a.tree) or {"this": str(HERE.parent.parent)}
    sets = {name: [] for name in trees}
    for s in a.set:
        name, kv = s.split(":", 1) if ":" in s.split("=", 1)[0] else (None, s)
        for n in ([name] if name else trees):
            sets[n].append(kv)
    shape_flags = [f"--n-fmri={a.n_fmri}", f"--n-eeg={a.n_eeg}", f"--t-f={a.t_f}",
                   f"--steps-per-tr={a.steps_per_tr}", f"--eeg-stride={a.eeg_stride}", f"--hidden={a.hidden}",
                   f"--blocks={a.blocks}", f"--windows={a.windows}", f"--steps={a.steps}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    results: dict = {}
    for rnd in range(a.rounds):
        for ck, prec in itertools.product(a.checkpointing, a.precision):
            for name, tree in trees.items():
                argv = [sys.executable, str(HERE), "--worker", tree, *shape_flags,
                        *[f"--set={kv}" for kv in sets[name]], f"--ckpt={ck}", f"--dtype={prec}"]
                if rnd == 0:
                    argv.append("--matmul")
                out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tree)
                if out.returncode:
                    raise SystemExit(f"worker {name} (checkpointing {ck}, {prec}) failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((name, ck, prec), []).append(r)
                print(f"[{time.strftime('%H:%M:%S')}] {name} ckpt={ck} {prec} round {rnd}: cpu_s {r['cpu_s']} "
                      f"hwm {r['rss_hwm_mib']:.0f} MiB", file=sys.stderr, flush=True)
    if a.out_json:
        Path(a.out_json).write_text(json.dumps({f"{k[0]}/ckpt{k[1]}/{k[2]}": v for k, v in results.items()}, indent=1))
    print(report(a, trees, sets, results))


def report(a, trees, sets, results) -> str:
    import platform
    rows = []
    for (name, ck, prec), rs in results.items():
        cpu = [c for r in rs for c in r["cpu_s"]]
        per_win = statistics.median(cpu) / a.windows
        first = rs[0]
        flops = first["flops"] / a.windows
        gemm = first["gemm_flops_per_cpu_s"]
        mm_cpu = first["matmul_self_share"] * first["profiled_cpu_s"]
        rows.append([name, "on" if ck else "off", prec, f"{per_win:.2f}", f"{1 / per_win:.3f}",
                     f"{REFERENCE_CPU_S / per_win:.1f}x",
                     f"{max(r['rss_hwm_mib'] for r in rs):,.0f}", f"{max(r['rss_growth_mib'] for r in rs):,.0f}",
                     f"{max(r['rss_growth_mib'] for r in rs) / 1024 / REFERENCE_RSS_GB:.2f}",
                     f"{flops / 1e9:.1f}", f"{first['matmul_self_share'] * 100:.0f} %",
                     f"{first['flops'] / mm_cpu / gemm * 100:.0f} %", f"{flops / per_win / gemm * 100:.0f} %",
                     f"{gemm / 1e9:.0f}", f"{min(cpu):.2f}-{max(cpu):.2f}"])
    hdr = ["tree", "ckpt", "precision", "CPU-s / window", "windows / CPU-s", "vs reference (38 CPU-s)", "peak RSS MiB",
           "RSS growth MiB", "growth / reference 3.25 GB", "GFLOP / window (matmul)", "matmul kernels' CPU share",
           "matmul kernels' rate / GEMM", "step's matmul-equivalent rate / GEMM", "GEMM GFLOP/CPU-s (its dtype)",
           "CPU-s per step (range)"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)] + ["| " + " | ".join(r) + " |" for r in rows]
    la = os.getloadavg()
    try:
        import torch
        tv = torch.__version__
    except ImportError:
        tv = "?"
    cmd = "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:])
    trees_txt = "; ".join(f"`{n}` = {d} ({', '.join(sets[n]) or 'defaults'})" for n, d in trees.items())
    tops = "\n".join(f"- {name} ckpt {'on' if ck else 'off'} {prec}: "
                     + ", ".join(f"{k} {v * 100:.0f} %" for k, v in rs[0]["top_ops"][:8])
                     for (name, ck, prec), rs in results.items())
    return (f"\n## Whole train step at the reference's shapes (cpu, {', '.join(a.precision)})\n\n`{cmd}`\n\n"
            f"Machine: 2-core AMD EPYC (shared), 1 torch thread per worker, torch {tv}, Python "
            f"{platform.python_version()}. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
            f"Load average at the end: {la[0]:.2f} (1 min), {la[1]:.2f} (5 min).\n\n"
            f"Trees: {trees_txt}. fMRI {a.n_fmri} x {a.t_f} TRs, EEG {a.n_eeg} x {a.t_f * a.steps_per_tr} latent "
            f"steps, hidden {a.hidden}, {a.blocks} blocks, {a.windows} window(s) per step; {a.rounds} worker(s) x "
            f"{a.steps} timed steps per row, trees alternated. Reference (peer anchor): {REFERENCE_CPU_S:.0f} CPU-s per "
            f"one-window step at 1 thread, +{REFERENCE_RSS_GB} GB RSS with its checkpointing.\n\n"
            + "\n".join(lines) + "\n\nLargest self-CPU ops (profiled step):\n\n" + tops + "\n")


if __name__ == "__main__":
    main()
