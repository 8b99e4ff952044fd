"""Peak memory of the full TwinBrain train step vs window length T and vs nodes, with and without
activation checkpointing (``twinbrain.train.parallel.apply_activation_checkpointing``, every block).

    python bench/memory_scaling.py                                    # CPU, small model
    python bench/memory_scaling.py --device cuda --dtype bf16         # GPU, default model

T sweep: fMRI TRs per window (EEG samples follow: same wall-clock span) at ``--n-fmri`` regions;
node sweep: fMRI regions at ``--t-f`` TRs (EEG channels fixed).  Each sweep is fitted with a straight
line (least squares): slope, intercept and R^2; for T also the ratio peak(T_max) / peak(T_max / 2),
which is 2 when memory is proportional to T.  Peak = live tensor bytes above the step's start
(bench/common.py).
"""
from __future__ import annotations

import argparse
import copy

import torch

import common
from common import OOM


def measure(a, device, dtype, ckpt: bool, repeats: int) -> tuple:
    """(peak bytes | 'OOM', median s/step | 'OOM') of one full train step."""
    return common.measure_full_step(a, a.batch, device, dtype, repeats, warmup=1, checkpointing=ckpt)


def fit(xs: list[float], ys: list, unit: str) -> str:
    """Least-squares line through the measured (non-OOM) points: slope, intercept, R^2."""
    pts = [(x, y) for x, y in zip(xs, ys) if not isinstance(y, str)]
    if len(pts) < 3:
        return "fewer than 3 points"
    x = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    y = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    icpt = float(y.mean() - slope * x.mean())
    r2 = 1 - float(((y - (icpt + slope * x)) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    return f"slope {slope:.3g} MiB per {unit}, intercept {icpt:.4g} MiB, R^2 {r2:.4f}"


def sweep(a, device, dtype, name: str, values: list[int], deadline) -> tuple[list, dict]:
    rows, peaks = [], {False: [], True: []}
    for v in values:
        if deadline.passed():
            rows.append([v, common.SKIPPED, "", "", "", ""])
            for ck in peaks:
                peaks[ck].append(common.SKIPPED)
            continue
        b = copy.copy(a)
        setattr(b, name, v)
        res = {ck: measure(b, device, dtype, ck, a.repeats) for ck in (False, True)}
        mib = {ck: m if m == OOM else m / common.MIB for ck, (m, _) in res.items()}
        for ck in peaks:
            peaks[ck].append(mib[ck])
        ratio = OOM if OOM in mib.values() else mib[True] / mib[False]
        rows.append([v, mib[False], mib[True], ratio, res[False][1], res[True][1]])
        print(rows[-1], flush=True)
    return rows, peaks


def summary(values: list[int], peaks: dict, unit: str, ratio_of_last: bool) -> list[str]:
    out = []
    for ck, label in ((False, "no checkpointing"), (True, "checkpointing")):
        line = f"- {label}: {fit(values, peaks[ck], unit)}"
        if ratio_of_last and len(values) >= 2 and values[-1] == 2 * values[-2]:
            hi, lo = peaks[ck][-1], peaks[ck][-2]
            if not isinstance(hi, str) and not isinstance(lo, str):
                line += f"; peak({values[-1]}) / peak({values[-2]}) = {hi / lo:.3f}"
        out.append(line)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_device_args(p)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=1, help="windows per step")
    p.add_argument("--t-list", type=int, nargs="+", default=[25, 50, 100, 200, 400])
    p.add_argument("--n-list", type=int, nargs="+", default=[100, 200, 500, 1000])
    p.add_argument("--repeats", type=int, default=2, help="timed steps per row (median)")
    p.add_argument("--max-seconds", type=float, default=0, help="per sweep: skip rows after this (0 = no limit)")
    common.add_shape_args(p)
    common.add_report_args(p)
    a = p.parse_args()
    device = common.setup_device(a)
    dtype = torch.bfloat16 if a.dtype == "bf16" else None
    torch.manual_seed(0)

    head = ["peak MiB, no ckpt", "peak MiB, ckpt", "ckpt / no ckpt", "s/step, no ckpt", "s/step, ckpt"]
    t_rows, t_peaks = sweep(a, device, dtype, "t_f", a.t_list, common.Deadline(a.max_seconds))
    n_rows, n_peaks = sweep(a, device, dtype, "n_fmri", a.n_list, common.Deadline(a.max_seconds))
    md = [f"Full train step (model + losses + balancer, backward, clipping, AdamW), {a.batch} window(s) per "
          f"step, {a.dtype}, {a.blocks} blocks. Base shapes: {common.shape_text(a)}. Peak = live tensor bytes "
          f"above the step's start; s/step = median of {a.repeats} after 1 warm-up.", "",
          f"Window length T (fMRI TRs; EEG {a.spt // a.eeg_stride} latent steps per TR), {a.n_fmri} regions:", "",
          common.md_table(["T"] + head, t_rows), "", *summary(a.t_list, t_peaks, "TR", True), "",
          f"fMRI nodes, T = {a.t_f} TRs, {a.n_eeg} EEG channels:", "",
          common.md_table(["nodes"] + head, n_rows), "", *summary(a.n_list, n_peaks, "node", False)]
    common.report(a, f"Memory scaling ({device.type}, {a.dtype})", "\n".join(md), device)


if __name__ == "__main__":
    main()
