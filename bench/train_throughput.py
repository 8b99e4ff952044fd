"""Training throughput of the full TwinBrain train step and the data loader's share of it.

    python bench/train_throughput.py                                  # CPU: batch 1 2 4
    python bench/train_throughput.py --device cuda --dtype bf16       # GPU: batch 1 2 4 ... 64

Per batch size: the full train step (model + losses + balancer, backward, clipping, AdamW; memory: see
bench/common.py) and TwinBrain's real training loader on a synthetic cohort of the same shapes, so the data
share of a step without overlap. The spatial sub-layer alone is timed by bench/spatial_operator.py (the
per-edge attention designs this bench once compared were removed with that operator).
"""
from __future__ import annotations

import argparse

import torch

import common
from common import OOM


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_device_args(p)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    p.add_argument("--batch", type=int, nargs="+", help="windows per step (default: 1..64 on GPU, 1 2 4 on CPU)")
    p.add_argument("--full-batch", type=int, nargs="*", help="batch sizes of the step (default: --batch)")
    p.add_argument("--full-repeats", type=int, default=3, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-loader", dest="loader", action="store_false", help="skip the data-loader timing")
    p.add_argument("--max-seconds", type=float, default=0,
                   help="skip rows starting after this many seconds (0 = no limit)")
    common.add_shape_args(p)
    common.add_report_args(p)
    a = p.parse_args()
    device = common.setup_device(a)
    dtype = torch.bfloat16 if a.dtype == "bf16" else None
    a.batch = a.batch or ([1, 2, 4, 8, 16, 32, 64] if device.type == "cuda" else [1, 2, 4])
    a.full_batch = a.batch if a.full_batch is None else a.full_batch
    torch.manual_seed(0)
    full = run_full(a, device, dtype, common.Deadline(a.max_seconds))
    md = [f"Shapes per window: {common.shape_text(a)}; {common.node_steps_per_window(a):,} node-steps per "
          f"window. {a.dtype}. Full TwinBrain train step ({a.blocks} blocks: model + losses + balancer, "
          f"backward, clipping, AdamW), median of {a.full_repeats} after {a.warmup} warm-up:", "",
          common.md_table(["windows", "s/step", "windows/s", "node-steps/s", "peak MiB",
                           "loader ms/batch", "data share"], full), "",
          "loader = TwinBrain's real training loader (DataModule.train_loader on a synthetic cohort of the "
          "same shapes: slicing, normalisation, collate, augmentation, num_workers 0) plus the copy to the "
          "device; data share = loader / (loader + step), i.e. without overlap."]
    common.report(a, f"Training throughput ({device.type}, {a.dtype})", "\n".join(md), device)


if __name__ == "__main__":
    main()
