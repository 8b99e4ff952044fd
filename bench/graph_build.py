"""Graph construction time: |Pearson r| connectivity + k-NN (+ threshold, symmetric union).

    python bench/graph_build.py                    # CPU: numpy (TwinBrain) and torch CPU
    python bench/graph_build.py --device cuda      # adds torch on the GPU

``twinbrain.data.graph`` is numpy-only (``abs_corr`` + ``knn_edges``, float64): that is the path the
data pipeline runs, once per recording or group, never per training step.  For comparison this
script carries a torch implementation of the same two steps (float32: centre, normalise, one
``[N, T] x [T, N]`` product, ``topk``, symmetric union), timed on the CPU and, when available, on
CUDA: compute only (signal already on the device) and end to end (numpy signal in, numpy edges out,
transfers included).  Signals: ``--sources`` shared latent sources + noise, so correlations are
realistic (|r| well above the 0.1 threshold), ``--t`` volumes per node.
"""
from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch

import common


def torch_abs_corr(x: torch.Tensor) -> torch.Tensor:
    """``|r|`` between rows of ``x [N, T]`` -> ``[N, N]``, diagonal 0 (as graph.abs_corr)."""
    xc = x - x.mean(dim=1, keepdim=True)
    xc = xc / xc.norm(dim=1, keepdim=True).clamp_min(1e-12)
    r = (xc @ xc.T).abs_().clamp_(0.0, 1.0)
    return r.fill_diagonal_(0.0)


def torch_knn(sim: torch.Tensor, k: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """As graph.knn_edges: each destination (row) takes its ``k`` most similar sources above
    ``threshold``, then the union with the reversed edges; weight = similarity."""
    n = sim.shape[0]
    s = sim.clone().fill_diagonal_(-float("inf"))
    val, src = s.topk(min(k, n - 1), dim=1)                                   # [N, k]
    dst = torch.arange(n, device=sim.device).unsqueeze(1).expand_as(src)
    keep = val > threshold
    adj = torch.zeros(n, n, dtype=torch.bool, device=sim.device)
    adj[src[keep], dst[keep]] = True
    adj |= adj.T.clone()
    src, dst = adj.nonzero(as_tuple=True)
    return torch.stack([src, dst]), sim[src, dst]


def signals(n: int, t: int, sources: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n, sources))
    return (mix @ rng.standard_normal((sources, t)) + 2.0 * rng.standard_normal((n, t))).astype(np.float32)


def blas_threads(n: int):
    """Limit numpy's BLAS to ``n`` threads (threadpoolctl, when installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n)


def main() -> None:
    from twinbrain.data.graph import abs_corr, knn_edges

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_device_args(p)
    p.add_argument("--nodes", type=int, nargs="+", default=[200, 500, 1000])
    p.add_argument("--t", type=int, default=1200, help="volumes (TRs) per node")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--sources", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    common.add_report_args(p)
    a = p.parse_args()
    device = common.setup_device(a)
    threads = torch.get_num_threads()
    rows = []
    for n in a.nodes:
        x = signals(n, a.t, a.sources)
        fns = {"numpy": lambda: knn_edges(abs_corr(x), a.k, a.threshold),
               "torch cpu": lambda: torch_knn(torch_abs_corr(torch.from_numpy(x)), a.k, a.threshold)}
        if device.type == "cuda":
            xd = torch.from_numpy(x).to(device)
            fns["torch cuda, on device"] = lambda: torch_knn(torch_abs_corr(xd), a.k, a.threshold)
            fns["torch cuda, numpy in/out"] = lambda: tuple(
                v.cpu().numpy() for v in torch_knn(torch_abs_corr(torch.from_numpy(x).to(device)), a.k, a.threshold))
        with blas_threads(threads):                           # numpy's BLAS gets torch's thread count
            times = common.time_round_robin(fns, device, a.repeats, warmup=1)
        ei_np, _ = knn_edges(abs_corr(x), a.k, a.threshold)
        ei_t, _ = torch_knn(torch_abs_corr(torch.from_numpy(x)), a.k, a.threshold)
        same = len({*map(tuple, ei_np.T)} & {*map(tuple, ei_t.numpy().T)})
        ref = common.median(times["numpy"])
        for name in fns:
            t = common.median(times[name])
            rows.append([n, name, 1e3 * t, ref / t, f"{ei_np.shape[1]:,}" if name == "numpy" else
                         f"{ei_t.shape[1]:,} ({same:,} shared with numpy)" if name == "torch cpu" else ""])
        print(rows[-len(fns):], flush=True)
    md = [f"{a.t} volumes per node, k = {a.k}, threshold {a.threshold}, symmetric union; median of {a.repeats} "
          f"after 1 warm-up; numpy BLAS and torch limited to {threads} thread(s). `numpy` = "
          f"twinbrain.data.graph (abs_corr + knn_edges, float64, the pipeline's path); `torch *` = the float32 "
          f"torch implementation in this script (not used by the pipeline).", "",
          common.md_table(["nodes", "implementation", "ms", "speed-up vs numpy", "edges"], rows)]
    common.report(a, f"Graph construction ({device.type})", "\n".join(md), device)


if __name__ == "__main__":
    main()
