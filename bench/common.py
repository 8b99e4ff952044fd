"""Shared helpers of the bench/ scripts: device, timing, peak memory, tables, docs/PERFORMANCE.md.

Benchmarks are scripts, not tests.  Conventions used by every script here:

* **time**: median of ``repeats`` calls after ``warmup`` calls, ``torch.cuda.synchronize`` around each
  call on CUDA; variants compared side by side run round-robin (a, b, c, a, b, c, ...) so that load
  drift on a shared machine hits them equally.  The 1-minute load average is printed with each table.
* **peak memory**: the highest total of live tensor bytes during ONE call, above what was live before
  it (activations, temporaries and gradients; not parameters, optimizer state or inputs that already
  existed).  CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` before the call (the
  caching allocator's reserve is not counted).  CPU: the same quantity from :class:`LiveTensorBytes`,
  which follows every tensor storage created during the call until it is freed; it is not process RSS
  (allocator caching and fragmentation are not in it).  Memory is measured in a separate, untimed
  call (the CPU tracker slows every operation down).
* **reports**: every script prints one Markdown section (exact command, machine, UTC date, load
  average) and appends it to docs/PERFORMANCE.md, or writes it to ``--out-md FILE`` instead.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PERFORMANCE_MD = ROOT / "docs" / "PERFORMANCE.md"
MIB = float(2 ** 20)
for _p in (ROOT, BENCH):               # `python bench/x.py` without an installed package
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


# ------------------------------------------------------------------ device and machine

def pick_device(name: str = "auto") -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                         "use --device cpu")
    return torch.device(name)


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda[:i]")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: steadier on a shared machine; 0 = torch's default)")


def setup_device(a: argparse.Namespace) -> torch.device:
    """Device from ``--device``; ``--threads`` sets torch's CPU thread count (stated in every table)."""
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    return pick_device(a.device)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: torch.device) -> str:
    """One line: accelerator (or CPU model and usable cores), torch version, Python."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    host = f"{cpu_model()}, {cores} usable cores"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = (f"{torch.cuda.get_device_name(device)} ({props.total_memory / 2 ** 30:.0f} GiB), "
                f"CUDA {torch.version.cuda}; host {host}")
    else:
        what = f"CPU only: {host}, {torch.get_num_threads()} torch thread(s)"
    return f"{what}; torch {torch.__version__}, Python {platform.python_version()}"


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ time and memory

OOM = "OOM"
SKIPPED = "skipped (time budget)"


class Deadline:
    """``--max-seconds`` budget of a script: rows started after it are reported as skipped."""

    def __init__(self, seconds: float | None):
        self.end = time.monotonic() + seconds if seconds else None

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


def time_round_robin(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5,
                     warmup: int = 1) -> dict[str, list[float] | str]:
    """Seconds per call of every function, measured round-robin; ``'OOM'`` for a function that ran
    out of memory (it is dropped from later rounds).  Returns ``{name: [seconds, ...] | 'OOM'}``."""
    out: dict[str, list[float] | str] = {name: [] for name in fns}
    for rnd in range(warmup + repeats):
        for name, fn in fns.items():
            if out[name] == OOM:
                continue
            try:
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                dt = time.perf_counter() - t0
            except RuntimeError as exc:          # torch.OutOfMemoryError is a RuntimeError
                if not is_oom(exc):
                    raise
                out[name] = OOM
            if out[name] == OOM:                 # freed here: the exception's frames held tensors
                free_memory(device)
                continue
            if rnd >= warmup:
                out[name].append(dt)
    return out


def median(times: list[float] | str) -> float | str:
    return times if times == OOM else statistics.median(times)


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak total bytes of the tensor storages created inside the region that are alive at once.

    Every operator output whose storage is new (not one of the op's inputs, as for in-place ops)
    is counted until the storage is freed (a weak reference's callback).  Storages that existed
    before the region are not counted.  Runs in backward too (autograd dispatches through it).
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        def leaves(x):    # sparse COO tensors: their index and value tensors
            ts = [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]
            return [p for t in ts for p in ((t._indices(), t._values()) if t.layout == torch.sparse_coo
                                            else (t,) if t.layout == torch.strided else ())]
        inputs = {t.untyped_storage().data_ptr() for t in leaves((args, kwargs))}
        for t in leaves(out):
            st = t.untyped_storage()
            if st.nbytes() == 0 or st.data_ptr() in inputs or st in self._seen:
                continue
            self._seen[st] = weakref.finalize(st, self._free, st.nbytes())
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
        return out


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | str:
    """Peak live tensor bytes of one call above the bytes live before it (see module docstring);
    ``'OOM'`` if it ran out of memory."""
    try:
        if device.type == "cuda":
            sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            sync(device)
            return torch.cuda.max_memory_allocated(device) - base
        tracker = LiveTensorBytes()
        with tracker:
            fn()
        return tracker.peak
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
    free_memory(device)                          # after the except block: its frames held tensors
    return OOM


def measure_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> float:
    """Device memory-bandwidth ceiling in GB/s: median of ``dst.copy_(src)`` over ``gib`` GiB
    (counted as read + write)."""
    n = int(gib * 2 ** 30 / 4)
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = time_round_robin({"copy": lambda: dst.copy_(src)}, device, repeats=repeats, warmup=2)["copy"]
    del src, dst
    free_memory(device)
    return 2 * n * 4 / statistics.median(times) / 1e9


_FREE_OPS = {"aten::_unsafe_view", "aten::detach", "aten::alias", "aten::lift_fresh"}


class TrafficCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Op-level DRAM-traffic model: every operator reads each tensor input and writes each tensor
    output exactly once (no cache reuse, views free).  A rough basis for "achieved GB/s"."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (getattr(func, "is_view", False) or func._schema.name in _FREE_OPS):
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out))
                       if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def traffic_bytes(fn: Callable[[], object]) -> int:
    counter = TrafficCounter()
    with counter:
        fn()
    return counter.bytes


# ------------------------------------------------------------------ tables and docs/PERFORMANCE.md

def fmt(v, digits: int = 3) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return ""
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command that produced this run, as typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script)] + sys.argv[1:])


def section_text(section: str, markdown: str, command: str, device: torch.device) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"\n## {section}\n\n`{command}`\n\nMachine: {machine(device)}. Date: {date}. "
            f"Load average at the end: {load_average()}.\n\n{markdown.strip()}\n")


def append_performance(section: str, markdown: str, command: str, device: torch.device | None = None) -> None:
    """Append ``## section`` with the exact command, the machine and the UTC date to docs/PERFORMANCE.md."""
    with PERFORMANCE_MD.open("a") as f:
        f.write(section_text(section, markdown, command, device or torch.device("cpu")))


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-md", help="write the section (Markdown) to this file instead of appending to "
                                    "docs/PERFORMANCE.md")
    p.add_argument("--no-append", action="store_true", help="print only; leave docs/PERFORMANCE.md alone")


def report(a: argparse.Namespace, section: str, markdown: str, device: torch.device) -> None:
    """Print the section; then write it to ``--out-md`` or append it to docs/PERFORMANCE.md."""
    print(section_text(section, markdown, command_line(), device))
    if a.out_md:
        Path(a.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out_md).write_text(section_text(section, markdown, command_line(), device))
        print(f"wrote {a.out_md}")
    elif not a.no_append:
        append_performance(section, markdown, command_line(), device)
        print(f"appended to {PERFORMANCE_MD}")


# ------------------------------------------------------------------ shapes and the full-model train step

def add_shape_args(p: argparse.ArgumentParser) -> None:
    """Window shapes: defaults = fMRI 200 regions x 50 TRs of 2 s, EEG 63 channels at 250 Hz over the
    same 100 s (25 000 samples, 200 latent steps of 125 samples), hidden 128, 4 blocks."""
    p.add_argument("--n-fmri", type=int, default=200)
    p.add_argument("--n-eeg", type=int, default=63)
    p.add_argument("--t-f", type=int, default=50, help="fMRI volumes (TRs) per window")
    p.add_argument("--spt", type=int, default=500, help="EEG samples per TR (2 s x 250 Hz)")
    p.add_argument("--eeg-stride", type=int, default=125, help="EEG samples per latent step")
    p.add_argument("--k-fmri", type=int, default=8)
    p.add_argument("--k-eeg", type=int, default=6)
    p.add_argument("--k-cross", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--blocks", type=int, default=4)


def shape_text(a) -> str:
    le = a.t_f * a.spt // a.eeg_stride
    return (f"fMRI {a.n_fmri} regions x {a.t_f} TRs; EEG {a.n_eeg} channels x {a.t_f * a.spt} samples "
            f"({le} latent steps of {a.eeg_stride}); k-NN in-edges per node fMRI {a.k_fmri}, EEG {a.k_eeg}, "
            f"EEG->fMRI {a.k_cross} per destination; hidden {a.hidden}, {a.heads} heads")


def node_steps_per_window(a) -> int:
    """Work units of one window: fMRI nodes x TRs + EEG nodes x latent steps (as the trainer counts)."""
    return a.n_fmri * a.t_f + a.n_eeg * (a.t_f * a.spt // a.eeg_stride)


def make_batch(a, windows: int, device: torch.device):
    """A PyG ``Batch`` of ``windows`` synthetic windows (bench_model.window: random k-NN graphs)."""
    from torch_geometric.data import Batch
    from bench_model import window
    return Batch.from_data_list([window(a, seed) for seed in range(windows)]).to(device)


def train_module(model, tc, mc):
    """The train step module of the TwinBrain tree on ``sys.path``: ``build_train_module`` (the trainer's
    own assembly), or, in a tree from before it (a "before" tree timed side by side), that tree's
    ``TrainModule(model, make_balancer(...))``.  Its ``counts(batch)`` are one batch's loss counts."""
    try:
        from twinbrain.model import build_train_module
    except ImportError:                           # a tree from before build_train_module
        from twinbrain.model import loss_counts, loss_term_names, make_balancer
        from twinbrain.train.step_module import TrainModule
        module = TrainModule(model, make_balancer(tc, loss_term_names()), tc, mc)
        module.counts = lambda batch: {k: float(v) for k, v in loss_counts(batch, tc, mc).items()}
        return module
    return build_train_module(model, tc, mc)


def host_memory_as_trainer(device) -> None:
    """As the trainer does on CPU: freed activations stay in the process (``train.host_memory``); a tree
    from before left glibc's defaults."""
    try:
        from twinbrain.train.host_memory import keep_freed_memory
    except ImportError:
        return
    if torch.device(device).type == "cpu":
        keep_freed_memory()


def freeze_fixed(model, tc) -> None:
    """As the trainer does: freeze the groups trained at lr 0 (``train.optim.fixed_groups``: the linear
    core's population coefficients, the closed forecast gates). A tree from before trained them at lr 0."""
    try:
        from twinbrain.train.optim import fixed_groups
    except ImportError:
        return
    model.freeze(fixed_groups(tc))


def full_model_step(a, windows: int, device: torch.device, dtype: torch.dtype | None,
                    checkpointing: bool = False) -> Callable[[], None]:
    """One trainer-equivalent step of the full TwinBrain model: ``TrainModule`` forward (model + losses
    + uncertainty balancer) under autocast, backward, grad clipping, fused-on-CUDA AdamW, zero_grad.
    ``checkpointing``: ``apply_activation_checkpointing(model.blocks, 'full')`` as the trainer does."""
    from twinbrain.config import ModelConfig, TrainConfig
    from twinbrain.model import build_model
    from twinbrain.train.optim import build_optimizer, param_groups
    from twinbrain.train.parallel import apply_activation_checkpointing

    mc = ModelConfig(hidden=a.hidden, blocks=a.blocks, heads=a.heads, eeg_patch=a.eeg_stride,
                     eeg_stride=a.eeg_stride)
    tc = TrainConfig(balancer="uncertainty")
    host_memory_as_trainer(device)
    model = build_model(mc, 4, 4, a.n_fmri, a.n_eeg, a.spt)
    freeze_fixed(model, tc)
    if checkpointing:
        apply_activation_checkpointing(model.blocks, "full", 1)
    module = train_module(model, tc, mc).to(device).train()
    opt = build_optimizer(param_groups(model, tc, extra=module.balancer), tc, device)
    params = [p for g in opt.param_groups for p in g["params"]]
    batch = make_batch(a, windows, device)
    counts = module.counts(batch)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = module(batch, counts, 1.0, 1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.n_params = sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]
    return step


def shapes(**kw) -> SimpleNamespace:
    """Shape namespace with the defaults of :func:`add_shape_args` (overridden by ``kw``)."""
    p = argparse.ArgumentParser()
    add_shape_args(p)
    ns = p.parse_args([])
    vars(ns).update(kw)
    return ns


def loader_batch_time(a, windows: int, device: torch.device, repeats: int = 5) -> float:
    """Median seconds to get one training batch from TwinBrain's real loader (``DataModule.train_loader``:
    window slicing, normalisation, collate, noise augmentation; ``num_workers = 0``, i.e. in the training
    process) and move it to ``device``.  Synthetic cohort: 6 subjects x 10 min at TR 2 s and
    ``spt / 2`` Hz EEG with the shapes of ``a`` (4 training subjects, 26 windows each)."""
    key = (a.n_fmri, a.n_eeg, a.t_f, a.spt, a.eeg_stride, a.k_fmri, a.k_eeg, a.k_cross)
    if key not in _DATA_MODULES:
        _DATA_MODULES.clear()
        _DATA_MODULES[key] = _synthetic_data_module(a)
    dm = _DATA_MODULES[key]
    dm.cfg.train.batch_size = windows
    it = iter(dm.train_loader())

    def fetch():
        next(it).to(device)
    return median(time_round_robin({"batch": fetch}, device, repeats, warmup=1)["batch"])


_DATA_MODULES: dict = {}


def _synthetic_data_module(a):
    import numpy as np
    from twinbrain.config import Config
    from twinbrain.data.module import DataModule
    from twinbrain.data.types import Cohort, Recording

    tr, vols = 2.0, 300
    rng = np.random.default_rng(0)
    recs = [Recording(subject=f"{s:02d}", session="1", task="rest", run="1",
                      eeg=rng.standard_normal((a.n_eeg, vols * a.spt), dtype=np.float32), eeg_sfreq=a.spt / tr,
                      fmri=rng.standard_normal((a.n_fmri, vols), dtype=np.float32), tr=tr,
                      channel_names=[f"E{i}" for i in range(a.n_eeg)], region_names=[f"R{i}" for i in range(a.n_fmri)],
                      channel_pos=rng.standard_normal((a.n_eeg, 3)).astype(np.float32),
                      region_pos=rng.standard_normal((a.n_fmri, 3)).astype(np.float32),
                      region_mask=np.ones(a.n_fmri, bool)) for s in range(6)]
    cfg = Config()
    cfg.data.window_s, cfg.data.stride_s, cfg.data.augment_noise = a.t_f * tr, 20.0, 0.05
    cfg.graph.k_fmri, cfg.graph.k_eeg, cfg.graph.k_cross = a.k_fmri, a.k_eeg, a.k_cross
    cfg.model.eeg_patch = cfg.model.eeg_stride = a.eeg_stride
    return DataModule(cfg, Cohort(recs)).setup()


def measure_full_step(a, windows: int, device: torch.device, dtype: torch.dtype | None, repeats: int,
                      warmup: int = 1, checkpointing: bool = False) -> tuple:
    """``(peak bytes | OOM, median s/step | OOM)`` of one full train step at ``windows`` per batch."""
    try:
        step = full_model_step(a, windows, device, dtype, checkpointing=checkpointing)
        t = median(time_round_robin({"s": step}, device, repeats, warmup=warmup)["s"])
        mem = peak_memory(step, device) if t != OOM else OOM
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
        t = mem = OOM
    step = None
    free_memory(device)
    return mem, t
