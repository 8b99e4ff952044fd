"""Forward+backward speed and peak memory of the TwinBrain model at realistic window sizes.

    python bench/bench_model.py                       # CPU, small batch
    python bench/bench_model.py --device cuda --windows 8 --bf16 --checkpoint

Defaults: 200 fMRI regions, 32 EEG channels, 40 TRs of 2 s at 250 Hz (20000 EEG samples), k-NN graphs
(8 / 6 / 4 edges per node), ModelConfig defaults (hidden 128, 4 blocks).  Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch_geometric.data import Batch, HeteroData

from twinbrain.config import ModelConfig, TrainConfig
from twinbrain.model import build_model, build_train_module


def knn_edges(n_src: int, n_dst: int, k: int, gen: torch.Generator, same: bool):
    """``k`` random in-edges per destination (no self loops for one node type), weights in [0.1, 1]."""
    scores = torch.rand(n_dst, n_src, generator=gen)
    if same:
        scores.fill_diagonal_(-1.0)
    src = scores.topk(min(k, n_src - int(same)), dim=1).indices               # [n_dst, k]
    dst = torch.arange(n_dst).unsqueeze(1).expand_as(src)
    ei = torch.stack([src.reshape(-1), dst.reshape(-1)])
    return ei, 0.1 + 0.9 * torch.rand(ei.shape[1], generator=gen)


def window(a, seed: int) -> HeteroData:
    gen = torch.Generator().manual_seed(seed)
    d = HeteroData()
    for m, n, t in (("fmri", a.n_fmri, a.t_f), ("eeg", a.n_eeg, a.t_f * a.spt)):
        x = torch.randn(n, t, 1, generator=gen)
        d[m].x, d[m].y = x, x.clone()
        d[m].mask, d[m].node_id, d[m].pos = torch.ones(n, dtype=torch.bool), torch.arange(n), torch.randn(n, 3)
    for rel, (ns, nd, k) in {("fmri", "fc", "fmri"): (a.n_fmri, a.n_fmri, a.k_fmri),
                             ("eeg", "fc", "eeg"): (a.n_eeg, a.n_eeg, a.k_eeg),
                             ("eeg", "to", "fmri"): (a.n_eeg, a.n_fmri, a.k_cross)}.items():
        d[rel].edge_index, d[rel].edge_weight = knn_edges(ns, nd, k, gen, rel[0] == rel[2])
    d.subject, d.session = torch.tensor([seed % 4]), torch.tensor([seed % 4])
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--n-fmri", type=int, default=200)
    p.add_argument("--n-eeg", type=int, default=32)
    p.add_argument("--t-f", type=int, default=40)
    p.add_argument("--spt", type=int, default=500, help="EEG samples per TR")
    p.add_argument("--k-fmri", type=int, default=8)
    p.add_argument("--k-eeg", type=int, default=6)
    p.add_argument("--k-cross", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing per block")
    p.add_argument("--full", action="store_true", help="gaussian head, dynamic adjacency, Laplacian PE")
    a = p.parse_args()
    dev = torch.device(a.device)
    extra = dict(probabilistic="gaussian", dynamic_adjacency=True, lap_pe_dim=8) if a.full else {}
    cfg, tc = ModelConfig(hidden=a.hidden, blocks=a.blocks, **extra), TrainConfig(balancer="uncertainty")
    model = build_model(cfg, 4, 4, a.n_fmri, a.n_eeg, a.spt).to(dev)
    if a.checkpoint:
        from torch.utils.checkpoint import checkpoint
        for blk in model.blocks:
            blk.forward = (lambda f: (lambda *args: checkpoint(f, *args, use_reentrant=False)))(blk.forward)
    module = build_train_module(model, tc, cfg).to(dev)
    opt = torch.optim.AdamW(list(module.parameters()), lr=1e-4)
    batch = Batch.from_data_list([window(a, s) for s in range(a.windows)]).to(dev)
    counts = module.counts(batch)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            total, _ = module(batch, counts)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return total

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        total = step()
    float(total)
    dt = (time.perf_counter() - t0) / a.steps
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "windows": a.windows,
           "bf16": a.bf16, "checkpoint": a.checkpoint, "full": a.full, "s_per_step": round(dt, 4),
           "windows_per_s": round(a.windows / dt, 2), "loss": round(float(total), 4),
           "params_M": round(sum(q.numel() for q in model.parameters()) / 1e6, 3)}
    if dev.type == "cuda":
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
