"""Training throughput of the spatial aggregation, three designs side by side, and of the full model.

    python bench/train_throughput.py                                  # CPU: batch 1 2 4
    python bench/train_throughput.py --device cuda --dtype bf16       # GPU: batch 1 2 4 ... 64

Spatial aggregation = the spatial sub-layer of one ``STBlock`` (its three real ``RelationAttention``
modules: fMRI->fMRI, EEG->EEG, EEG->fMRI on the per-TR EEG mean), forward + backward with respect to
the inputs and the parameters, at equal shapes and equal math in three designs:

  (a) twinbrain: one call per relation over all time steps, ``[N, T, H]`` (what the model does);
  (b) loop:      a Python loop over time steps, one call per step on the ``[N, 1, H]`` slice;
  (c) virtual:   time folded into the node axis (``[T*N, 1, H]``, node index ``t*N + n``) with the edge
                 list replicated T times, one call per relation.  The replicated edge list is built
                 outside the timed region (a cost (c) would pay per batch; left out in its favour).

The three are checked to give the same output before timing.  (d) is the full TwinBrain train step
(model + losses + balancer, backward, clipping, AdamW).  Memory: see bench/common.py.
"""
from __future__ import annotations

import argparse

import torch

import common
from common import OOM


def relation_call(mode: str, rel, x_src, x_dst, ei, ew, rep):
    """One relation in design ``mode``; ``rep = (ei_rep, ew_rep)`` for 'virtual'."""
    if mode == "twinbrain":
        return rel(x_src, x_dst, ei, ew)
    if mode == "loop":
        return torch.cat([rel(x_src[:, t:t + 1], x_dst[:, t:t + 1], ei, ew) for t in range(x_dst.shape[1])], 1)
    n_dst, t, hid = x_dst.shape
    flat = lambda x: x.transpose(0, 1).reshape(t * x.shape[0], 1, hid)          # index t*N + n
    out = rel(flat(x_src), flat(x_dst), *rep)                                   # [T*N_dst, 1, H]
    return out.view(t, n_dst, hid).transpose(0, 1)


def replicate_edges(ei, ew, n_src: int, n_dst: int, t: int):
    """Edge list of the time-expanded graph: copy ``s`` connects ``s*n_src + src -> s*n_dst + dst``."""
    off = torch.arange(t, device=ei.device).view(t, 1)
    src = (ei[0].view(1, -1) + off * n_src).reshape(-1)
    dst = (ei[1].view(1, -1) + off * n_dst).reshape(-1)
    return torch.stack([src, dst]), ew.repeat(t)


def spatial_case(a, windows: int, device, dtype):
    """Inputs, parameters and one train-step closure per design for ``windows`` windows."""
    from twinbrain.model import STBlock
    batch = common.make_batch(a, windows, device)
    steps_per_tr = a.spt // a.eeg_stride
    block = STBlock(a.hidden, a.heads, 3, 0.0, steps_per_tr).to(device)
    nf, ne = batch["fmri"].num_nodes, batch["eeg"].num_nodes
    z_f = torch.randn(nf, a.t_f, a.hidden, device=device, requires_grad=True)
    z_e = torch.randn(ne, a.t_f * steps_per_tr, a.hidden, device=device, requires_grad=True)
    g_f, g_e = torch.randn_like(z_f), torch.randn_like(z_e)
    rels = {}
    for key, (n_s, n_d, t) in {("fmri", "fc", "fmri"): (nf, nf, z_f.shape[1]),
                               ("eeg", "fc", "eeg"): (ne, ne, z_e.shape[1]),
                               ("eeg", "to", "fmri"): (ne, nf, z_f.shape[1])}.items():
        ei, ew = batch[key].edge_index, batch[key].edge_weight
        rels["__".join(key)] = (ei, ew, replicate_edges(ei, ew, n_s, n_d, t))

    def forward(mode):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            pooled = block.pool_eeg_to_tr(z_e, z_f.shape[1])
            call = lambda name, xs, xd: relation_call(mode, block.rel[name], xs, xd, *rels[name])
            msg_f = call("fmri__fc__fmri", z_f, z_f) + call("eeg__to__fmri", pooled, z_f)
            msg_e = call("eeg__fc__eeg", z_e, z_e)
        return msg_f, msg_e

    def make_step(mode):
        def step():
            msg_f, msg_e = forward(mode)
            torch.autograd.backward([msg_f, msg_e], [g_f.to(msg_f.dtype), g_e.to(msg_e.dtype)])
            block.zero_grad(set_to_none=True)
            z_f.grad = z_e.grad = None
        return step

    with torch.no_grad():
        ref = forward("twinbrain")
        diffs = {m: max(float((o - r).abs().max()) for o, r in zip(forward(m), ref)) for m in ("loop", "virtual")}
    return {m: make_step(m) for m in ("twinbrain", "loop", "virtual")}, diffs, forward


def run_spatial(a, device, dtype, deadline):
    rows, ratio_rows, checks, bw_case = [], [], [], None
    per_window = common.node_steps_per_window(a)
    for b in a.batch:
        if deadline.passed():
            rows.append([b, "all", common.SKIPPED, "", "", ""])
            continue
        steps = None
        try:
            steps, diffs, forward = spatial_case(a, b, device, dtype)
        except RuntimeError as exc:
            if not common.is_oom(exc):
                raise
        if steps is None:
            rows.append([b, "all (setup)", OOM, OOM, OOM, OOM])
            common.free_memory(device)
            continue
        checks.append(f"batch {b}: max |difference| to (a): loop {diffs['loop']:.1e}, virtual {diffs['virtual']:.1e}")
        times = common.time_round_robin(steps, device, a.repeats, a.warmup)
        res = {}
        for mode, step in steps.items():
            t = common.median(times[mode])
            mem = common.peak_memory(step, device) if t != OOM else OOM
            res[mode] = (t, mem)
            rows.append([b, LABEL[mode], t if t == OOM else 1e3 * t, t if t == OOM else b / t,
                         t if t == OOM else b * per_window / t, mem if mem == OOM else mem / common.MIB])
        ta, ma = res["twinbrain"]
        ratio = lambda x, y: OOM if OOM in (x, y) else x / y
        ratio_rows.append([b, ratio(res["loop"][0], ta), ratio(res["loop"][1], ma),
                           ratio(res["virtual"][0], ta), ratio(res["virtual"][1], ma)])
        if ta != OOM:
            bw_case = (b, ta, steps["twinbrain"])
        del steps, forward
        common.free_memory(device)
    return rows, ratio_rows, checks, bw_case


def run_full(a, device, dtype, deadline):
    rows = []
    per_window = common.node_steps_per_window(a)
    for b in a.full_batch:
        if deadline.passed():
            rows.append([b, common.SKIPPED, "", "", "", "", ""])
            continue
        mem, t = common.measure_full_step(a, b, device, dtype, a.full_repeats, warmup=a.warmup)
        load = common.loader_batch_time(a, b, device, a.full_repeats) if a.loader else None
        share = None if load is None or t == OOM else load / (load + t)
        rows.append([b, t, t if t == OOM else b / t, t if t == OOM else b * per_window / t,
                     mem if mem == OOM else mem / common.MIB, None if load is None else 1e3 * load,
                     None if share is None else f"{100 * share:.1f} %"])
    return rows


LABEL = {"twinbrain": "(a) twinbrain, all steps at once", "loop": "(b) loop over time steps",
         "virtual": "(c) virtual nodes, edges x T"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_device_args(p)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    p.add_argument("--batch", type=int, nargs="+", help="windows per step (default: 1..64 on GPU, 1 2 4 on CPU)")
    p.add_argument("--full-batch", type=int, nargs="*", help="batch sizes for (d) (default: --batch)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (median)")
    p.add_argument("--full-repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-loader", dest="loader", action="store_false", help="skip the data-loader timing")
    p.add_argument("--max-seconds", type=float, default=0,
                   help="per part (spatial, full model): skip rows starting after this many seconds (0 = no limit)")
    common.add_shape_args(p)
    common.add_report_args(p)
    a = p.parse_args()
    device = common.setup_device(a)
    if device.type == "cpu" and a.dtype == "bf16":
        print("note: bf16 autocast on CPU is slower than fp32 here (shared/ENVIRONMENT.md)")
    dtype = torch.bfloat16 if a.dtype == "bf16" else None
    a.batch = a.batch or ([1, 2, 4, 8, 16, 32, 64] if device.type == "cuda" else [1, 2, 4])
    a.full_batch = a.batch if a.full_batch is None else a.full_batch
    torch.manual_seed(0)
    deadline = common.Deadline(a.max_seconds)

    rows, ratio_rows, checks, bw_case = run_spatial(a, device, dtype, deadline)
    md = [f"Shapes per window: {common.shape_text(a)}; {common.node_steps_per_window(a):,} node-steps per "
          f"window. {a.dtype}; median of {a.repeats} timed calls after {a.warmup} warm-up, designs run "
          f"round-robin. Peak = live tensor bytes above the step's start (bench/common.py).",
          "", "Spatial aggregation (one STBlock's three relations), forward + backward:", "",
          common.md_table(["windows", "design", "ms/step", "windows/s", "node-steps/s", "peak MiB"], rows),
          "", "Cost of (b) and (c) relative to (a) (> 1: (a) is faster / leaner):", "",
          common.md_table(["windows", "(b)/(a) time", "(b)/(a) peak", "(c)/(a) time", "(c)/(a) peak"], ratio_rows),
          "", "Same math: " + "; ".join(checks) + "."]
    if bw_case is not None:
        b, t, fn = bw_case
        traffic = common.traffic_bytes(fn)
        ceiling = common.measure_bandwidth(device, gib=1.0 if device.type == "cuda" else 0.25)
        md += ["", f"Bandwidth of (a) at {b} windows: op-level traffic model {traffic / 1e9:.2f} GB per step "
               f"(every op reads its inputs and writes its outputs once) / {1e3 * t:.1f} ms = "
               f"{traffic / t / 1e9:.1f} GB/s; measured copy ceiling {ceiling:.1f} GB/s -> "
               f"{100 * traffic / t / 1e9 / ceiling:.0f} % of it."]
        bw_case = fn = None
        common.free_memory(device)
    if a.full_batch:
        full = run_full(a, device, dtype, common.Deadline(a.max_seconds))
        md += ["", f"(d) Full TwinBrain train step ({a.blocks} blocks: model + losses + balancer, backward, "
               f"clipping, AdamW), median of {a.full_repeats}:", "",
               common.md_table(["windows", "s/step", "windows/s", "node-steps/s", "peak MiB",
                                "loader ms/batch", "data share"], full), "",
               "loader = TwinBrain's real training loader (DataModule.train_loader on a synthetic cohort of the "
               "same shapes: slicing, normalisation, collate, augmentation, num_workers 0) plus the copy to the "
               "device; data share = loader / (loader + step), i.e. without overlap."]
    common.report(a, f"Training throughput ({device.type}, {a.dtype})", "\n".join(md), device)


if __name__ == "__main__":
    main()
