"""Spatial sub-layer of one STBlock: the dense directed coupling (today) vs the removed edge attention.

    OMP_NUM_THREADS=1 python bench/spatial_operator.py                  # reference shapes, batch 1 and 4
    OMP_NUM_THREADS=1 python bench/spatial_operator.py --no-append      # print only

(a) **coupling** = ``STBlock.spatial`` of the package: LayerNorm, one value projection per relation,
    one dense batched GEMM ``C[target, source] @ [B, M_s, T*H]`` per relation (fMRI->fMRI, EEG->EEG,
    EEG->fMRI, fMRI->EEG), couplings including the per-subject low-rank deltas.
(a0) the same coupling in the order of commit 6ac2cf8: the fMRI -> EEG relation held on the EEG grid
    before the value projection and the product (5x the rows).
(b) **edge attention (removed)** = the spatial sub-layer of commit 7e46897: LayerNorm and
    ``RelationAttention`` per relation (softmax over the k-NN in-edges of every destination, separately
    for every time step and head; ``[E, T, heads, d]`` gathers), three relations (there was no
    fMRI->EEG relation).  Copied below from ``git show 7e46897:twinbrain/model/layers.py`` as a
    reference implementation; it is not part of the package any more.

Both run forward + backward (sum of the messages as the loss) on the same inputs.  CPU time =
``time.process_time`` per call (median, designs alternated a, b, a, b, ...); peak = live tensor bytes
above the call's start (bench/common.py ``LiveTensorBytes``); RSS = growth of ``ru_maxrss`` over one call
in a fresh subprocess per design (VmHWM after a reset; allocator caching included).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
from torch import Tensor, nn

import common  # noqa: F401  (puts the repository on sys.path)
from twinbrain.model.blocks import STBlock
from twinbrain.model.coupling import Coupling
from twinbrain.model.layers import dense_index
from twinbrain.schema import MODALITIES, RELATIONS, relation_key

# ----------------------------------------------------------------------------------------------------
# REMOVED REFERENCE IMPLEMENTATION (commit 7e46897, twinbrain/model/layers.py and blocks.py), kept here
# only to measure what the dense coupling replaced.  Do not import it from the package.
_NEG = -1e30


def segment_softmax(logits: Tensor, index: Tensor, num_segments: int, valid: Tensor) -> Tensor:
    """[removed, 7e46897] Softmax over the entries of ``logits [E, ...]`` that share a destination."""
    logits = logits.float()
    shape = (num_segments,) + tuple(logits.shape[1:])
    vshape = (-1,) + (1,) * (logits.dim() - 1)
    validf = valid.view(vshape).to(logits.dtype)
    masked = logits.masked_fill(~valid.view(vshape), _NEG)
    with torch.no_grad():
        idx = index.view(vshape).expand_as(masked)
        top = masked.new_full(shape, _NEG).scatter_reduce(0, idx, masked, "amax", include_self=True)
    ex = torch.exp(masked - top.index_select(0, index)) * validf
    denom = ex.new_zeros(shape).index_add_(0, index, ex)
    return ex / (denom.index_select(0, index) + 1e-16)


class RelationAttention(nn.Module):
    """[removed, 7e46897] Multi-head attention message passing for one relation over all time steps:
    ``x_src [N_s, T, H], x_dst [N_d, T, H], edge_index [2, E], edge_weight [E] -> [N_d, T, H]``."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.dim = heads, hidden // heads
        self.q, self.k = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.v, self.out = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.edge_scale = nn.Parameter(torch.ones(heads))

    def forward(self, x_src: Tensor, x_dst: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        n_dst, t, hid = x_dst.shape
        src, dst = edge_index[0], edge_index[1]
        q = self.q(x_dst).float().view(n_dst, t, self.heads, self.dim)
        k = self.k(x_src).float().view(x_src.shape[0], t, self.heads, self.dim)
        v = self.v(x_src).float().view(x_src.shape[0], t, self.heads, self.dim)
        logits = (q.index_select(0, dst) * k.index_select(0, src)).sum(-1) / math.sqrt(self.dim)
        w = edge_weight.float()
        logits = logits + self.edge_scale.float() * torch.log(w.clamp_min(1e-6)).view(-1, 1, 1)
        alpha = segment_softmax(logits, dst, n_dst, w > 0)                     # [E, T, heads]
        msg = alpha.unsqueeze(-1) * v.index_select(0, src)                     # [E, T, heads, d]
        agg = msg.new_zeros(n_dst, t, self.heads, self.dim).index_add_(0, dst, msg)
        return self.out(agg.view(n_dst, t, hid).to(x_dst.dtype))


class RemovedSpatial(nn.Module):
    """[removed, 7e46897] STBlock's spatial sub-layer: norm_space + three RelationAttention relations."""

    def __init__(self, hidden: int, heads: int, steps_per_tr: int):
        super().__init__()
        self.steps_per_tr = steps_per_tr
        self.norm_space = nn.ModuleDict({m: nn.LayerNorm(hidden) for m in MODALITIES})
        self.rel = nn.ModuleDict({k: RelationAttention(hidden, heads)
                                  for k in ("fmri__fc__fmri", "eeg__fc__eeg", "eeg__to__fmri")})

    def forward(self, h: dict[str, Tensor], edges: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        z = {m: self.norm_space[m](h[m]) for m in MODALITIES}
        n, l_e, hid = z["eeg"].shape
        pooled = z["eeg"].view(n, l_e // self.steps_per_tr, self.steps_per_tr, hid).mean(2)
        msg_f = self.rel["fmri__fc__fmri"](z["fmri"], z["fmri"], *edges["fmri__fc__fmri"])
        msg_f = msg_f + self.rel["eeg__to__fmri"](pooled, z["fmri"], *edges["eeg__to__fmri"])
        msg_e = self.rel["eeg__fc__eeg"](z["eeg"], z["eeg"], *edges["eeg__fc__eeg"])
        return {"fmri": msg_f, "eeg": msg_e}
# END OF THE REMOVED REFERENCE IMPLEMENTATION
# ----------------------------------------------------------------------------------------------------


def _spatial_align_first(blk: STBlock, h, couplings, idx, keep, n_windows):
    """The same coupling as ``STBlock.spatial`` in the order of commit 6ac2cf8 (main before this bench):
    fMRI -> EEG held on the EEG grid first (``[N_f, L_e, H]``), then projected and multiplied (5x the rows).
    Differs from today only at the EEG steps before the first TR ends (there it sent ``C @ bias``)."""
    from twinbrain.model.coupling import couple, from_dense, to_dense
    msg = {m: None for m in MODALITIES}
    for rel in RELATIONS:
        src, _, dst = rel
        key = relation_key(rel)
        x = blk.last_tr_for_eeg(h["fmri"], h["eeg"].shape[1]) if (src, dst) == ("fmri", "eeg") else h[src]
        v = blk.value[key](x) * keep[src]                   # (the value projections normalise, EEG -> fMRI pools)
        dense = to_dense(v, idx[src], n_windows, blk.n_slots[src])
        out = from_dense(couple(couplings[key], dense), idx[dst], tuple(h[dst].shape[1:]))
        msg[dst] = out if msg[dst] is None else msg[dst] + out
    return msg


def knn(n_src: int, n_dst: int, k: int, windows: int, same: bool, gen: torch.Generator):
    """``k`` random in-edges per destination per window (batched node numbering), weights in [0.1, 1]."""
    eis = []
    for w in range(windows):
        scores = torch.rand(n_dst, n_src, generator=gen)
        if same:
            scores.fill_diagonal_(-1.0)
        src = scores.topk(min(k, n_src - int(same)), dim=1).indices
        dst = torch.arange(n_dst).unsqueeze(1).expand_as(src)
        eis.append(torch.stack([src.reshape(-1) + w * n_src, dst.reshape(-1) + w * n_dst]))
    ei = torch.cat(eis, 1)
    return ei, 0.1 + 0.9 * torch.rand(ei.shape[1], generator=gen)


def build(a, design: str, windows: int):
    """``(module, fn)``: ``fn()`` runs one forward + backward of the design's spatial sub-layer."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n = {"fmri": a.n_fmri, "eeg": a.n_eeg}
    t = {"fmri": a.t_f, "eeg": a.t_f * a.steps_per_tr}
    h = {m: torch.randn(windows * n[m], t[m], a.hidden, generator=gen, requires_grad=True) for m in MODALITIES}
    if design.startswith("coupling"):
        blk = STBlock(a.hidden, a.heads, 3, 0.0, a.steps_per_tr, n)
        coup = nn.ModuleDict({relation_key(r): Coupling(n[r[2]], n[r[0]], 4, a.rank, r[0] == r[2])
                              for r in RELATIONS})
        for c in coup.values():                      # personal deltas != 0, as after training
            if a.rank:
                nn.init.normal_(c.u, std=0.01)
        subject = torch.arange(windows) % 4
        win = {m: torch.arange(windows).repeat_interleave(n[m]) for m in MODALITIES}
        idx = {m: dense_index(torch.arange(n[m]).repeat(windows), win[m], n[m]) for m in MODALITIES}
        keep = {m: torch.ones(windows * n[m], 1, 1) for m in MODALITIES}
        params = list(blk.value.parameters()) + list(coup.parameters())

        spatial = blk.spatial if design == "coupling" else (
            lambda *args: _spatial_align_first(blk, *args))

        def fn():
            cs = {k: c(subject)[0] for k, c in coup.items()}
            msg = spatial(h, cs, idx, keep, windows)
            sum(v.sum() for v in msg.values()).backward()
    else:
        mod = RemovedSpatial(a.hidden, a.heads, a.steps_per_tr)
        edges = {"fmri__fc__fmri": knn(n["fmri"], n["fmri"], a.k_fmri, windows, True, gen),
                 "eeg__fc__eeg": knn(n["eeg"], n["eeg"], a.k_eeg, windows, True, gen),
                 "eeg__to__fmri": knn(n["eeg"], n["fmri"], a.k_cross, windows, False, gen)}
        params = list(mod.parameters())

        def fn():
            msg = mod(h, edges)
            sum(v.sum() for v in msg.values()).backward()

    def step():
        for p in params + list(h.values()):
            p.grad = None
        fn()
    step.n_params = sum(p.numel() for p in params)  # type: ignore[attr-defined]
    return step


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def one_rss(a, design: str, windows: int) -> dict:
    """Subprocess body: peak RSS growth (bytes) over the first call, after the inputs exist.  The
    high-water mark is reset first (``/proc/self/clear_refs``): ``ru_maxrss`` is inherited from the
    parent process and would hide the call's own peak."""
    torch.set_num_threads(1)
    step = build(a, design, windows)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    step()
    return {"rss_delta": (_status_kib("VmHWM") - before) * 1024}


DESIGNS = {"coupling": "(a) dense directed coupling, 4 relations (today)",
           "coupling_align_first": "(a0) same, fMRI->EEG held on the EEG grid before the product (6ac2cf8)",
           "attention": "(b) softmax edge attention, 3 relations (removed, 7e46897)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-fmri", type=int, default=190)
    p.add_argument("--n-eeg", type=int, default=63)
    p.add_argument("--t-f", type=int, default=50, help="fMRI TRs per window")
    p.add_argument("--steps-per-tr", type=int, default=5, help="EEG latent steps per TR (250 / 50)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--k-fmri", type=int, default=15, help="in-edges per fMRI region (removed layer)")
    p.add_argument("--k-eeg", type=int, default=10, help="in-edges per EEG channel (removed layer)")
    p.add_argument("--k-cross", type=int, default=10, help="EEG in-edges per fMRI region (removed layer)")
    p.add_argument("--rank", type=int, default=4, help="personal coupling rank (model.coupling_rank)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--one", default="", help=argparse.SUPPRESS)
    common.add_report_args(p)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.one:
        print(json.dumps(one_rss(a, a.one, a.batch[0])))
        return
    dev = torch.device("cpu")
    rows, ratios = [], []
    for b in a.batch:
        steps = {d: build(a, d, b) for d in DESIGNS}
        cpu = {d: [] for d in DESIGNS}
        for rnd in range(1 + a.repeats):                     # 1 warm-up round, designs alternated
            for d, fn in steps.items():
                t0 = time.process_time()
                fn()
                dt = time.process_time() - t0
                if rnd:
                    cpu[d].append(dt)
        peak = {d: common.peak_memory(fn, dev) for d, fn in steps.items()}
        rss = {}
        for d in DESIGNS:
            argv = [sys.executable, __file__, "--one", d, "--batch", str(b)] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                if k in ("n_fmri", "n_eeg", "t_f", "steps_per_tr", "hidden", "heads", "k_fmri", "k_eeg",
                         "k_cross", "rank")]
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            rss[d] = json.loads(out.strip().splitlines()[-1])["rss_delta"]
        med = {d: statistics.median(cpu[d]) for d in DESIGNS}
        for d in DESIGNS:
            rows.append([b, DESIGNS[d], med[d], med[d] / b, min(cpu[d]), peak[d] / common.MIB,
                         rss[d] / common.MIB, steps[d].n_params])
        for d in ("attention", "coupling_align_first"):
            ratios.append([b, DESIGNS[d], med[d] / med["coupling"], peak[d] / peak["coupling"],
                           rss[d] / max(rss["coupling"], 1)])
        steps = None
    le = a.t_f * a.steps_per_tr
    text = (f"Shapes per window: fMRI {a.n_fmri} regions x {a.t_f} TRs, EEG {a.n_eeg} channels x {le} latent "
            f"steps ({a.steps_per_tr} per TR), hidden {a.hidden}, {a.heads} heads; removed layer's k-NN "
            f"in-edges per destination: fMRI {a.k_fmri}, EEG {a.k_eeg}, EEG->fMRI {a.k_cross}; coupling rank "
            f"{a.rank}. fp32, 1 torch thread, forward + backward, median of {a.repeats} after 1 warm-up, "
            f"designs alternated.\n\n"
            + common.md_table(["windows", "design", "CPU s / call", "CPU s / window", "min CPU s",
                               "live tensor peak MiB", "RSS growth MiB", "parameters"], rows)
            + "\n\nOther designs over today's (a) (> 1: (a) is cheaper):\n\n"
            + common.md_table(["windows", "design", "CPU time", "live tensor peak", "RSS growth"], ratios))
    common.report(a, "Spatial operator: dense coupling vs removed edge attention (cpu, fp32)", text, dev)


if __name__ == "__main__":
    main()
