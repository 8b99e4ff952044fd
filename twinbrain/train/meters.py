"""Measurements for telemetry: step timing, memory, FLOPs, device peaks, cross-rank reduction.

Pure helpers with no knowledge of wandb, files or progress bars, so each can be
tested alone and reused by benchmarks.  ``telemetry.Telemetry`` composes them.
"""
from __future__ import annotations

import re
import resource
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

GIB = float(2**30)

# Dense (no sparsity) bf16 tensor-core peak per device, in TFLOP/s, from the vendors'
# datasheets (the "with sparsity" figures halved).  MFU is only reported for devices
# listed here: a guessed peak would make the utilisation number meaningless.
# Order matters: more specific names first ("H100 NVL" before "H100", "L40S" before "L4").
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    (r"H200 NVL", 835.5, "H200 NVL"),
    (r"H200", 989.4, "H200 SXM"),
    (r"H100 NVL", 835.5, "H100 NVL"),
    (r"H100 PCIe", 756.0, "H100 PCIe"),
    (r"H100", 989.4, "H100 SXM"),        # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"B200", 2250.0, "B200"),
    (r"A100", 312.0, "A100"),            # SXM and PCIe share the bf16 peak
    (r"L40S", 362.1, "L40S"),
    (r"\bL4\b", 121.0, "L4"),
    (r"MI300X|MI325X", 1307.4, "MI300X/MI325X"),
)
PEAK_BASIS = "dense bf16 tensor-core peak (vendor datasheet)"


def peak_tflops(device_name: str) -> tuple[float | None, str]:
    """Per-device peak for MFU: ``(tflops, label)``, or ``(None, 'unknown device: NAME')``.

    ``device_name`` is ``torch.cuda.get_device_name()`` (or ``'cpu'``).  Unknown
    devices get ``None`` rather than a default, so no utilisation is invented.
    """
    for pattern, tflops, label in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops, label
    return None, f"unknown device: {device_name}"


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as counted by ``torch.utils.flop_counter.FlopCounterMode``.

    ``fn`` should run one representative forward + backward (one micro-batch).  The
    counter sees tensor contractions only (matmul, conv, attention), so the result is
    labelled "matmul FLOPs": element-wise work, scatters and norms are not in it.  A
    ``Linear`` of ``[B, K] -> [B, N]`` counts ``2*B*K*N`` forward and the same again for
    each gradient it needs (weight; input only when the input requires grad).
    Deterministic for fixed shapes.  On distributed wrappers it counts this rank's work.
    Recomputation under activation checkpointing is counted (work the device really does,
    so the derived MFU is closer to hardware utilisation); regions compiled with
    ``torch.compile`` bypass the counter and count 0.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _as_float(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().item())
    return float(v)


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo (CPU) wants CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_OPS = {"mean": "SUM", "sum": "SUM", "max": "MAX", "min": "MIN"}


def reduce_scalars(values: Mapping[str, Any], op: str = "mean") -> dict[str, float]:
    """Reduce a dict of scalars (floats or 0-d tensors) across ranks in ONE collective.

    ``op``: ``'mean' | 'sum' | 'max' | 'min'``.  Every rank must call it with the same
    keys (checked: a key mismatch raises instead of silently mixing values).  Without
    an initialised process group (or with one rank) it only converts to floats.
    """
    if op not in _OPS:
        raise ValueError(f"reduce_scalars: op '{op}' is not one of {', '.join(_OPS)}")
    keys = sorted(values)
    if not _dist_ready():
        return {k: _as_float(values[k]) for k in keys}
    device = _collective_device()
    parts = [values[k].detach().reshape(()).to(device, torch.float64) if isinstance(values[k], torch.Tensor)
             else torch.tensor(float(values[k]), dtype=torch.float64, device=device) for k in keys]
    key_crc = float(zlib.crc32("\0".join(keys).encode()))
    parts.append(torch.tensor(key_crc, dtype=torch.float64, device=device))
    buf = torch.stack(parts)
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, _OPS[op]))
    world = dist.get_world_size()
    out = buf.tolist()
    expected = key_crc * world if _OPS[op] == "SUM" else key_crc
    if out[-1] != expected:
        raise RuntimeError(f"reduce_scalars: ranks passed different keys (this rank: {keys}); "
                           "every rank must log the same scalar names")
    if op == "mean":
        out = [v / world for v in out]
    return dict(zip(keys, out[:-1]))


def reduce_window(sums: list[float], maxima: list[float]) -> tuple[list[float], list[float]]:
    """Sum ``sums`` and take the max of ``maxima`` across ranks (two small collectives)."""
    if not _dist_ready():
        return list(sums), list(maxima)
    device = _collective_device()
    s = torch.tensor(sums, dtype=torch.float64, device=device)
    m = torch.tensor(maxima, dtype=torch.float64, device=device)
    dist.all_reduce(s, op=dist.ReduceOp.SUM)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return s.tolist(), m.tolist()


@dataclass
class StepWindow:
    """Timing and counts accumulated over one logging window (this rank)."""
    steps: int = 0
    windows: float = 0.0
    node_steps: float = 0.0
    step_time: float = 0.0      # s inside steps (step_begin .. step_end), excludes eval/checkpoint pauses
    data_time: float = 0.0      # s of that spent waiting for the batch (step_begin .. data_loaded)


class StepTimer:
    """Times step phases: ``begin() -> loaded() -> end(n_windows, n_node_steps)``.

    Only time inside steps counts, so evaluation and checkpointing between steps do not
    depress throughput.  CUDA work is asynchronous: ``close_window`` synchronises once, so
    queued kernels are charged to the window they belong to.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.device = device
        self.window = StepWindow()
        self._t0: float | None = None
        self._t1: float | None = None
        self._last_end: float | None = None

    def begin(self) -> None:
        self._t0 = time.perf_counter()
        self._t1 = None

    def loaded(self) -> None:
        self._t1 = time.perf_counter()

    def end(self, n_windows: float, n_node_steps: float) -> float:
        """Close one step; returns its duration in seconds."""
        now = time.perf_counter()
        t0 = self._t0 if self._t0 is not None else (self._last_end or now)
        w = self.window
        w.steps += 1
        w.windows += float(n_windows)
        w.node_steps += float(n_node_steps)
        w.step_time += now - t0
        w.data_time += (self._t1 - t0) if self._t1 is not None else 0.0
        self._t0, self._t1, self._last_end = None, None, now
        return now - t0

    def close_window(self) -> StepWindow:
        """Return the finished window (after draining queued GPU work) and start a new one."""
        if self.cuda and self._last_end is not None:
            torch.cuda.synchronize(self.device)
            self.window.step_time += time.perf_counter() - self._last_end
        w, self.window = self.window, StepWindow()
        self._last_end = None
        return w


def host_rss_bytes() -> int:
    """Resident set size of this process (psutil; falls back to the peak from getrusage)."""
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or restricted (some sandboxes): peak is the best we have
        return host_peak_rss_bytes()


def host_peak_rss_bytes() -> int:
    """Process high-water mark of resident memory (getrusage; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class MemoryMeter:
    """Peak device memory per logging window (CUDA) and host RSS (always)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.capacity = torch.cuda.get_device_properties(device).total_memory if self.cuda else 0

    def read(self) -> dict[str, float]:
        """Memory metrics since the last ``reset_window`` (GiB; pct of device capacity)."""
        out: dict[str, float] = {}
        if self.cuda:
            s = torch.cuda.memory_stats(self.device)
            alloc = s.get("allocated_bytes.all.peak", 0)
            reserved = s.get("reserved_bytes.all.peak", 0)
            out["mem_peak_gib"] = alloc / GIB
            out["mem_reserved_peak_gib"] = reserved / GIB
            out["mem_peak_pct"] = 100.0 * alloc / self.capacity
            out["mem_reserved_peak_pct"] = 100.0 * reserved / self.capacity
            out["alloc_retries"] = float(s.get("num_alloc_retries", 0))
            out["ooms"] = float(s.get("num_ooms", 0))
        out["rss_gib"] = host_rss_bytes() / GIB
        out["rss_peak_gib"] = host_peak_rss_bytes() / GIB
        return out

    def reset_window(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
