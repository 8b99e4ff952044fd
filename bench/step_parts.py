"""Parts of the train step on CPU: EEG temporal attention by window, and torch.compile of one STBlock.

    OMP_NUM_THREADS=1 python bench/step_parts.py attention      # CausalSelfAttention fwd+bwd per window
    OMP_NUM_THREADS=1 python bench/step_parts.py compile        # eager vs torch.compile(STBlock), fwd+bwd
    OMP_NUM_THREADS=1 python bench/step_parts.py livepeak DIR   # live tensor peak of a whole step, tree DIR
    OMP_NUM_THREADS=1 python bench/step_parts.py core           # EEG linear core fwd+bwd, coefficients trained / frozen

Reference shapes: EEG 63 channels x 250 latent steps, fMRI 190 regions x 50 TRs, hidden 128, 4 heads.
CPU time = ``time.process_time`` of this process (median of 5 after 1 warm-up, variants alternated).
Note: inductor compiles in worker processes, so the compile's own CPU time is larger than reported here;
its wall time is printed too.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

import common  # noqa: F401  (puts the repository on sys.path)
from twinbrain.model.blocks import STBlock
from twinbrain.model.layers import CausalSelfAttention
from twinbrain.schema import RELATIONS, relation_key


def alternate(fns: dict, repeats: int = 5) -> dict[str, float]:
    ts = {k: [] for k in fns}
    for r in range(1 + repeats):
        for k, f in fns.items():
            t0 = time.process_time()
            f()
            if r:
                ts[k].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def attention() -> None:
    x = torch.randn(63, 250, 128, requires_grad=True)
    mods = {w: CausalSelfAttention(128, 4, w) for w in (0, 16, 25, 32, 50, 64)}
    for m in mods.values():
        m.load_state_dict(mods[0].state_dict())
    res = alternate({w: (lambda m=m: m(x).sum().backward()) for w, m in mods.items()})
    print("| attention_window | fwd+bwd CPU s (63 x 250 steps, hidden 128) |\n|---|---|")
    for w, t in res.items():
        print(f"| {w or 'all (0)'} | {t:.3f} |")


def compile_block() -> None:
    n = {"fmri": 190, "eeg": 63}
    torch.manual_seed(0)
    blk = STBlock(128, 4, 3, 0.1, 5, n, attention_window=16).train()
    cs = {relation_key(r): torch.randn(n[r[2]], n[r[0]]) * 0.01 for r in RELATIONS}
    idx = {m: torch.arange(k) for m, k in n.items()}
    keep = {m: torch.ones(k, 1, 1) for m, k in n.items()}
    hf = torch.randn(190, 50, 128, requires_grad=True)
    he = torch.randn(63, 250, 128, requires_grad=True)
    comp = torch.compile(blk)

    def run(f):
        a, b = f(hf, he, cs, idx, keep, 1)
        (a.sum() + b.sum()).backward()
    t0, w0 = time.process_time(), time.perf_counter()
    run(comp)
    print(f"compile + first call: {time.process_time() - t0:.1f} CPU s in this process, "
          f"{time.perf_counter() - w0:.1f} s wall")
    res = alternate({"eager": lambda: run(blk), "compiled": lambda: run(comp)})
    print(f"fwd+bwd CPU s per block: eager {res['eager']:.3f}, compiled {res['compiled']:.3f}")


def eeg_core() -> None:
    """The EEG linear core at the reference shapes (VAR(5) over 63 channels, 400 samples iterated from each of
    250 latent steps, personal rank 4) in training: fwd+bwd of a weighted sum of its forecasts, with the
    population coefficients trained and frozen (``train.core_lr_scale`` 0, the default)."""
    from twinbrain.model.coupling import LinearCore
    torch.manual_seed(0)
    x, subject, w = torch.randn(1, 63, 25000), torch.tensor([1]), torch.randn(1, 63, 250, 400)
    cores = {}
    for frozen in (False, True):
        core = LinearCore(63, 5, 400, n_subjects=4, rank=4, stride=100).train()
        with torch.no_grad():
            core.coef.mul_(0.5)
            core.u.normal_(0, 0.01)
        for p in (core.coef, core.intercept) if frozen else ():
            p.requires_grad_(False)
        cores["frozen" if frozen else "trained"] = core
    res = alternate({k: (lambda c=c: (c(x, subject) * w).sum().backward()) for k, c in cores.items()})
    print("| coefficients | fwd+bwd CPU s |\n|---|---|")
    for k, t in res.items():
        print(f"| {k} | {t:.3f} |")


def live_peak(tree: str) -> None:
    """Live tensor peak (``common.LiveTensorBytes``) of one whole train step at the reference's shapes
    (bench/train_step_reference.py's step), activation checkpointing off and on, with the TwinBrain
    package of source tree ``tree`` (already imported modules of this tree are dropped first)."""
    import argparse
    import json
    from pathlib import Path
    root = Path(tree).resolve()
    for name in [m for m in sys.modules if m == "twinbrain" or m.startswith("twinbrain.")]:
        del sys.modules[name]
    sys.path[:] = [str(root)] + [x for x in sys.path if Path(x).resolve() != common.ROOT]
    import twinbrain
    assert Path(twinbrain.__file__).resolve().is_relative_to(root), twinbrain.__file__
    from torch_geometric.data import Batch
    from train_step_reference import _window
    from twinbrain.config import ModelConfig, TrainConfig
    from twinbrain.model import build_model
    from twinbrain.train.optim import build_optimizer, param_groups
    from twinbrain.train.parallel import apply_activation_checkpointing
    a = argparse.Namespace(n_fmri=190, n_eeg=63, t_f=50, steps_per_tr=5, eeg_stride=100)
    out = {}
    for ck in (0, 1):
        torch.manual_seed(0)
        mc = ModelConfig(hidden=128, blocks=4, eeg_patch=100, eeg_stride=100)
        tc = TrainConfig(balancer="uncertainty")
        model = build_model(mc, 4, 4, 190, 63, 500)
        common.freeze_fixed(model, tc)
        if ck:
            apply_activation_checkpointing(model.blocks, "full", 1)
        module = common.train_module(model, tc, mc).train()
        opt = build_optimizer(param_groups(model, tc, extra=module.balancer), tc, torch.device("cpu"))
        batch = Batch.from_data_list([_window(a, 0)])
        counts = module.counts(batch)
        params = [p for g in opt.param_groups for p in g["params"]]

        def step():
            loss, _ = module(batch, counts, 1.0, 1.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()
        out[f"checkpointing {'on' if ck else 'off'}"] = f"{common.peak_memory(step, torch.device('cpu')) / common.MIB:.0f} MiB"
    print(json.dumps({"tree": str(root), "live tensor peak": out}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    cmd = sys.argv[1] if len(sys.argv) > 1 else "attention"
    if cmd == "livepeak":
        live_peak(sys.argv[2] if len(sys.argv) > 2 else str(common.ROOT))
    else:
        {"attention": attention, "compile": compile_block, "core": eeg_core}[cmd]()
