"""Jacobian EC speed: the copy-per-source ``jvp`` it replaced vs ``vmap`` over source tangents (one primal).

Both compute ``d forecast_i / d x_j(last context step)`` exactly (their difference is printed). The
old implementation is kept here, verbatim from commit 6ac2cf8, only as the reference of this comparison.
Timed round-robin in CPU seconds (``time.process_time``) on a warm-started rate-network twin with the
nonlinear path open (gate 1), so the jvp runs through every layer as in a trained twin.

    python bench/ec_jacobian_speed.py --sizes 20,40 --windows 16 [--no-append]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch_geometric.data import Batch

from common import add_report_args, md_table, report
from ec_ground_truth import run_config, simulate
from twinbrain.data.module import DataModule
from twinbrain.data.simulate.systems import series_cohort
from twinbrain.model import build_model
from twinbrain.train.warm_start import warm_start
from twinbrain.twin.perturb import jacobian_ec, with_inputs
from twinbrain.twin.twin import Twin


def jacobian_ec_copies(twin, windows: list, modality: str = "fmri", horizon: int = 1, at_step: int | None = None,
                       batch_size: int = 64) -> np.ndarray:
    """The pre-vmap implementation (one window copy per source, each with its own primal forward)."""
    n = twin.n_nodes(modality)
    jobs = [(w, list(range(a, min(n, a + batch_size)))) for w in range(len(windows)) for a in range(0, n, batch_size)]
    acc = torch.zeros(n, n, dtype=torch.float64)
    cnt = torch.zeros(n, n, dtype=torch.float64)
    passes, cur = [], []
    for job in jobs:                                  # each copy carries one source: pack batch_size copies
        if cur and sum(len(j[1]) for j in cur) + len(job[1]) > batch_size:
            passes.append(cur)
            cur = []
        cur.append(job)
    if cur:
        passes.append(cur)
    for jobs_in_pass in passes:
        data, slots, heads = [], [], []
        for w, nodes in jobs_in_pass:
            heads.append(len(data))
            data += [windows[w]] * len(nodes)
            slots += nodes
        batch = Batch.from_data_list(data).to(twin.device)
        twin.check_slots(batch)
        x = batch[modality].x
        t_len = x.shape[1]
        step = t_len - 1 if at_step is None else int(at_step)
        if not 0 <= step < t_len:
            raise ValueError(f"at_step={step} is outside the {modality} context of {t_len} steps")
        tangent = torch.zeros_like(x).view(len(data), n, t_len)
        tangent[torch.arange(len(data)), torch.tensor(slots), step] = 1.0

        def forecast(x_in):
            return twin.predict(with_inputs(batch, {modality: x_in}), horizon, need=(modality,))[modality]

        # The fused attention kernels have no forward-mode derivative; the math kernel (same result) has.
        with sdpa_kernel(SDPBackend.MATH):
            _, jv = torch.func.jvp(forecast, (x,), (tangent.view_as(x),))
        jv = jv.detach().double().view(len(data), n, -1).mean(-1).cpu()          # [copies, N]
        mask = batch[modality].mask.view(len(data), n).cpu() if "mask" in batch[modality] else \
            torch.ones(len(data), n, dtype=torch.bool)
        for (w, nodes), h in zip(jobs_in_pass, heads):
            rows = jv[h:h + len(nodes)]                                            # [j, i]
            ok = (mask[h][None, :] & mask[h][nodes][:, None]).double()
            acc[:, nodes] += (rows * ok).t()
            cnt[:, nodes] += ok.t()
    return torch.where(cnt > 0, acc / cnt.clamp_min(1), torch.full_like(acc, float("nan"))).numpy()


def build_twin(n: int, tmp: str) -> Twin:
    a = SimpleNamespace(var_rho=0.8, rate_rho=1.5, rate_sigma=0.5, density=0.2, subjects=5, length=600, stride=12,
                        hidden=16, steps=2, override=[])
    _, series = simulate("rate", n, 0, a)
    cfg = run_config(n, Path(tmp), a, 0)
    dm = DataModule(cfg, cohort=series_cohort(series)).setup()
    torch.manual_seed(0)
    model = build_model(cfg, n_subjects=len(dm.subject_map), n_sessions=len(dm.session_map),
                        n_fmri_slots=dm.n_fmri_slots, n_eeg_slots=dm.n_eeg_slots, samples_per_tr=dm.samples_per_tr)
    warm_start(model, dm, cfg)
    with torch.no_grad():
        model.gate["fmri"].weight.fill_(1.0)
    return Twin(model, cfg, dm.metadata(), data=dm)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20,40")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    add_report_args(p)
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            twin = build_twin(n, tmp)
            ws = list(twin.windows(split="test"))[:a.windows]
            fns = {"copies": lambda: jacobian_ec_copies(twin, ws), "vmap": lambda: jacobian_ec(twin, ws)}
            times: dict[str, list[float]] = {k: [] for k in fns}
            out = {}
            for _ in range(a.repeats):                 # round-robin: load drift hits both equally
                for k, fn in fns.items():
                    t0 = time.process_time()
                    out[k] = fn()
                    times[k].append(time.process_time() - t0)
            old, new = statistics.median(times["copies"]), statistics.median(times["vmap"])
            rows.append([n, len(ws), old, new, old / new, float(np.nanmax(np.abs(out["copies"] - out["vmap"])))])
    md = md_table(["nodes", "windows", "copies CPU-s", "vmap CPU-s", "speed-up", "max |difference|"], rows)
    report(a, "Jacobian EC: vmap over source tangents vs one copy per source (CPU, 1 thread)", md,
           torch.device("cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
