"""Training telemetry: metrics.jsonl, wandb, throughput, memory, FLOPs, progress, profiling.

Call sequence (every rank calls every method; only the main rank writes)::

    tel = Telemetry(cfg.logging, run_dir, is_main=..., world_size=..., device=..., config_dict=cfg.to_dict(),
                    run_name=..., resume_run_id=meta.get("wandb_run_id"), max_steps=..., backend=..., start_step=step)
    tel.set_step_flops(flops, n_windows)   # logging.flops: FLOPs of one micro-batch, counted once by the
                                           # caller on a copy (count_flops), before the first step
    for step in range(start_step + 1, max_steps + 1):
        tel.step_begin()
        batch = next(it); tel.data_loaded()
        with tel.maybe_profile(step):
            for micro in micro_batches:
                backward(loss(model(micro)))
            ...optimizer step...
        tel.step_end(step, n_windows=LOCAL windows, n_node_steps=LOCAL nodes x time steps)
        if tel.should_flush(step):
            tel.log(step, reduce_scalars({"loss": ..., "loss/recon_fmri": ..., "lr/base": ...}))
            tel.flush(step)                       # collective: all ranks
        if eval_due: tel.log_eval(step, metrics)  # metrics already global
    tel.close()

Counts given to ``step_end`` are this rank's; ``flush`` sums them across ranks (one small
collective per logging window), so ``windows_per_s`` is the global rate and
``*_per_device`` is that divided by the world size.  Scalars given to ``log`` must already
be reduced (use ``reduce_scalars``).  Key conventions: ``loss``, ``loss/<term>``,
``balancer/<term>``, ``lr/<group>``, ``grad_norm``, ``skipped_steps``; eval keys get ``val/``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist

from ..config import LoggingConfig
from ..rundir import RunDir
from .meters import MemoryMeter, StepTimer, count_flops, reduce_scalars, reduce_window
from .profiling import OOMSnapshots, StepProfiler
from .tracker import WandbRun, collect_environment, generate_run_id, resolve_wandb_mode

__all__ = ["Telemetry", "count_flops", "reduce_scalars", "summary_table"]

log = logging.getLogger(__name__)

def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _broadcast_str(value: str, world_size: int) -> str:
    """Rank 0's value on every rank, so all ranks store the same run id in checkpoints."""
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return value
    obj = [value]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite the JSONL log ``path`` without records past ``step`` (and without a torn last line).

    A resumed run repeats the steps between its checkpoint and the interruption; dropping them first
    keeps one record per step. Atomic: a temporary file replaces the log. Returns the records dropped.
    """
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            late = int(rec.get("step", 0)) > step
        except (ValueError, TypeError, AttributeError):
            late = True                 # a line torn by the interruption
        if late:
            dropped += 1
        else:
            keep.append(line + "\n")
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        tmp.replace(path)
    return dropped


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item()
    elif hasattr(v, "item") and hasattr(v, "dtype"):  # numpy scalar: json cannot encode float32
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN/inf; null marks a non-finite value
    return v


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def summary_table(last_metrics: Mapping[str, Any] | None, eval_metrics: Mapping[str, Any] | None) -> str:
    """A small aligned two-column table of the final training and validation numbers."""
    last, ev = dict(last_metrics or {}), dict(eval_metrics or {})
    wanted = ["step", "loss"] + sorted(k for k in last if k.startswith("loss/")) + [
        "windows_per_s", "node_steps_per_s", "step_time_s", "data_share", "tflops_per_s", "mfu",
        "mem_peak_gib", "mem_reserved_peak_gib", "mem_peak_pct", "rss_peak_gib", "skipped_steps"]
    rows = [(k, _fmt(last[k])) for k in wanted if k in last]
    rows += [(k, _fmt(v)) for k, v in sorted(ev.items()) if k not in ("step", "kind", "time")]
    if not rows:
        return "(no metrics recorded)"
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    rule = "-" * (width + vwidth + 3)
    return "\n".join([rule] + [f"{k:<{width}}   {v:>{vwidth}}" for k, v in rows] + [rule])


class Telemetry:
    """Everything the trainer reports, behind a handful of calls (see the module docstring).

    Args:
        cfg_logging: ``LoggingConfig`` (log_every, wandb, project, progress, flops, profile_steps,
            memory_snapshot_on_oom).
        run_dir: the run directory; ``metrics.jsonl``, ``wandb/``, ``profile/``, ``memory/`` go there.
        is_main: True on the rank that writes files and talks to wandb.
        world_size: number of ranks (data-parallel devices).
        device: this rank's device; CUDA enables GPU memory metrics and snapshots.
        config_dict: the resolved config, logged to wandb.
        run_name: display name for the tracker.
        resume_run_id: the id stored in the checkpoint being resumed (None for a fresh run).
        max_steps: final step, for the progress bar and ETA.
        backend: parallel backend name (single | ddp | fsdp2 | deepspeed), logged with the environment.
        start_step: step already completed (resume), so the bar starts there.
        launch: the resolved backend, ZeRO stage, DeepSpeed JSON and precision (environment record).
    """

    def __init__(self, cfg_logging: LoggingConfig, run_dir: Path, *, is_main: bool, world_size: int,
                 device: torch.device, config_dict: dict, run_name: str, resume_run_id: str | None,
                 max_steps: int, backend: str = "", start_step: int = 0, launch: dict | None = None):
        self.cfg = cfg_logging
        self.run_dir = Path(run_dir)
        layout = RunDir(self.run_dir)
        self.is_main = is_main
        self.world_size = max(int(world_size), 1)
        self.device = torch.device(device)
        self.max_steps = int(max_steps)
        self.rank = _rank()
        self.timer = StepTimer(self.device)
        self.memory = MemoryMeter(self.device)
        self.env = collect_environment(self.device, self.world_size, backend)
        if launch:
            self.env["launch"] = launch
        self.last_metrics: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self._pending: dict[str, Any] = {}
        self._step_flops: float | None = None
        self._flops_per_window = False
        self._t_start = time.time()
        self._wall_last = time.perf_counter()
        self._step_last = int(start_step)
        self._closed = False
        self._said: set[str] = set()

        self.wandb: WandbRun | None = None
        run_id = resume_run_id or generate_run_id()
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            mode = resolve_wandb_mode(cfg_logging.wandb)
            if mode is not None:
                self.wandb = WandbRun(project=cfg_logging.project, run_id=run_id, name=run_name,
                                      run_dir=self.run_dir, mode=mode, config={**config_dict, "env": self.env},
                                      device=self.device)
                run_id = self.wandb.run_id
        self.run_id: str = _broadcast_str(run_id, self.world_size)

        # metrics.jsonl holds exactly one record per training log step (the run-directory contract);
        # validation records go to eval_metrics.jsonl, the environment of each (re)start to environment.jsonl.
        if is_main:
            for path in (layout.metrics, layout.eval_metrics):
                n = drop_records_after(path, int(start_step))
                if n:
                    log.info("%s: dropped %d record(s) past step %d, which this run repeats", path.name, n,
                             int(start_step))
        self._jsonl = open(layout.metrics, "a", encoding="utf-8") if is_main else None
        self._eval_jsonl = open(layout.eval_metrics, "a", encoding="utf-8") if is_main else None
        if is_main:
            with open(layout.environment, "a", encoding="utf-8") as f:
                f.write(json.dumps({"kind": "env", "step": int(start_step), "time": self._t_start,
                                    "run_id": self.run_id, **self.env}, allow_nan=False, default=str) + "\n")

        self.progress = self._progress_mode(cfg_logging.progress) if is_main else "off"
        self._bar = None
        if self.progress == "bar":
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self.max_steps, initial=int(start_step), file=sys.stdout,
                             dynamic_ncols=True, desc="train", unit="step")

        self._profiler = StepProfiler(cfg_logging.profile_steps, layout.profile, self.rank,
                                      self.memory.cuda)
        self._oom = OOMSnapshots(cfg_logging.memory_snapshot_on_oom, layout.memory, self.rank,
                                 self.memory.cuda)
        if cfg_logging.memory_snapshot_on_oom and not self.memory.cuda:
            self._say_once("oom", "memory snapshot on OOM needs CUDA; off on %s", self.device.type)

    # ------------------------------------------------------------ steps
    def step_begin(self) -> None:
        """Start of a step, before asking the loader for the batch."""
        self.timer.begin()

    def data_loaded(self) -> None:
        """The batch is in hand (and on the device): the rest of the step is compute."""
        self.timer.loaded()

    def step_end(self, step: int, n_windows: float, n_node_steps: float) -> None:
        """End of optimizer step ``step`` with THIS rank's counts.

        ``n_windows``: windows (graphs) processed in the step, over all micro-batches.
        ``n_node_steps``: sum over those windows of nodes x time steps (fMRI and EEG nodes
        at their own time resolution) - the unit of work of the spatio-temporal blocks.
        """
        self.timer.end(n_windows, n_node_steps)
        if self._bar is not None:
            self._bar.update(max(int(step) - self._bar.n, 0))

    def should_flush(self, step: int) -> bool:
        """True every ``log_every`` steps and at the last step (same answer on every rank)."""
        return step % self.cfg.log_every == 0 or step >= self.max_steps

    # ------------------------------------------------------------ metrics
    def set_step_flops(self, flops: float, n_windows: int | None = None) -> None:
        """Matmul FLOPs per device for one optimizer step (e.g. from ``count_flops``).

        With ``n_windows`` (the windows in the counted batch) the count is scaled by the
        windows actually processed, which stays right for variable batch sizes and for
        gradient accumulation (count one micro-batch, pass its window count).
        """
        if flops and flops > 0:
            self._step_flops = float(flops) / (n_windows if n_windows else 1)
            self._flops_per_window = bool(n_windows)

    def log(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Queue already-reduced scalars for the next ``flush`` (later values replace earlier)."""
        if self.is_main:
            self._pending.update({k: _jsonable(v) for k, v in scalars.items()})

    def flush(self, step: int) -> dict[str, Any]:
        """Close the logging window: add throughput/memory/FLOPs, write one record, log to wandb.

        A collective when ``world_size > 1``: every rank must call it at the same steps.
        Returns the record on the main rank, ``{}`` elsewhere.
        """
        w = self.timer.close_window()
        mem = self.memory.read()
        mem_sum_keys = [k for k in ("alloc_retries", "ooms") if k in mem]
        mem_max_keys = [k for k in mem if k not in mem_sum_keys]
        sums, maxima = reduce_window([w.windows, w.node_steps] + [mem[k] for k in mem_sum_keys],
                                     [w.step_time, w.data_time, float(w.steps)] + [mem[k] for k in mem_max_keys])
        self.memory.reset_window()
        if not self.is_main:
            self._pending.clear()
            return {}
        windows, node_steps = sums[0], sums[1]
        step_time, data_time, n_steps = maxima[0], maxima[1], max(maxima[2], 1.0)
        rec: dict[str, Any] = {"kind": "train", "step": int(step), "time": time.time(),
                               "elapsed_s": time.time() - self._t_start}
        rec.update(self._pending)
        self._pending = {}
        rate = 1.0 / step_time if step_time > 0 else 0.0
        rec["windows_per_s"] = windows * rate
        rec["node_steps_per_s"] = node_steps * rate
        rec["windows_per_s_per_device"] = windows * rate / self.world_size
        rec["node_steps_per_s_per_device"] = node_steps * rate / self.world_size
        rec["step_time_s"] = step_time / n_steps
        rec["data_share"] = data_time / step_time if step_time > 0 else 0.0
        rec.update(zip(mem_sum_keys, sums[2:]))
        rec.update(zip(mem_max_keys, maxima[3:]))
        if self._step_flops is not None and step_time > 0:
            work = windows / self.world_size if self._flops_per_window else n_steps
            rec["tflops_per_s"] = self._step_flops * work / step_time / 1e12
            peak = self.env["peak_tflops"]
            rec["mfu"] = rec["tflops_per_s"] / peak if peak else None
        rec = {k: _jsonable(v) for k, v in rec.items()}
        self._write(rec)
        if self.wandb is not None:
            self.wandb.log(rec, step)
        self._report_progress(rec)
        self.last_metrics = rec
        return rec

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Validation metrics (already global): ``val/``-prefixed, a ``kind: eval`` record + wandb."""
        if not self.is_main:
            return
        vals = {(k if k.startswith("val/") else f"val/{k}"): _jsonable(v) for k, v in metrics.items()}
        rec = {"kind": "eval", "step": int(step), "time": time.time(), **vals}
        self._write(rec)
        if self.wandb is not None:
            self.wandb.log(vals, step)
        if self.progress != "off":
            self._console("eval " + f"step {int(step):>{len(str(self.max_steps))}}" + "".join(
                f" | {k} {_fmt(v)}" for k, v in vals.items()))
        self.last_eval = rec

    # ------------------------------------------------------------ profiling, OOM
    def maybe_profile(self, step: int) -> contextlib.AbstractContextManager[None]:
        """Wrap each training step; records a torch.profiler trace when ``profile_steps > 0``.

        ``profile_steps`` steps are recorded after a short warm-up into ``run_dir/profile/``
        (see ``profiling.StepProfiler``); otherwise a no-op context.
        """
        return self._profiler.wrap()

    def on_oom(self) -> Path | None:
        """Dump a CUDA memory snapshot to ``run_dir/memory/`` and return its path.

        Runs automatically at the allocator's OOM when ``memory_snapshot_on_oom`` is set; the
        trainer may also call it from an ``except torch.OutOfMemoryError`` handler (up to
        3 snapshots per rank).  On CPU: None, noted once in the log.
        """
        if not self.memory.cuda:
            self._say_once("oom", "memory snapshot on OOM needs CUDA; off on %s", self.device.type)
        return self._oom.dump()

    # ------------------------------------------------------------ output
    @staticmethod
    def _progress_mode(setting: str) -> str:
        if setting == "auto":
            return "bar" if sys.stdout.isatty() else "lines"
        if setting not in ("bar", "lines", "off"):
            raise ValueError(f"logging.progress: '{setting}' is not one of auto, bar, lines, off")
        return setting

    def _report_progress(self, rec: dict[str, Any]) -> None:
        step = rec["step"]
        now = time.perf_counter()
        per_step = (now - self._wall_last) / max(step - self._step_last, 1)
        self._wall_last, self._step_last = now, step
        if self._bar is not None:
            self._bar.set_postfix(loss=_fmt(rec.get("loss")), win_s=_fmt(rec.get("windows_per_s")), refresh=True)
        elif self.progress == "lines":
            mem = rec.get("mem_peak_gib", rec.get("rss_gib"))
            self._console(
                f"step {step:>{len(str(self.max_steps))}}/{self.max_steps} | loss {_fmt(rec.get('loss'))}"
                f" | {_fmt(rec['windows_per_s'])} win/s | {_fmt(rec['node_steps_per_s'])} node-steps/s"
                f" | mem {_fmt(mem)} GiB | data {100 * rec['data_share']:.0f}%"
                f" | eta {_fmt_eta(per_step * (self.max_steps - step))}")

    def _console(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def _say_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._said and self.is_main:
            self._said.add(key)
            log.info(msg, *args)

    def _write(self, rec: dict[str, Any]) -> None:
        f = self._eval_jsonl if rec.get("kind") == "eval" else self._jsonl
        if f is not None:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
            f.flush()

    def close(self, exit_code: int = 0, print_summary: bool = False) -> None:
        """Stop the profiler, finish wandb (``exit_code`` marks a failed run), close files.

        ``print_summary``: also print ``summary_table`` on the main rank (unless progress is off).
        """
        if self._closed:
            return
        self._closed = True
        self._profiler.stop()
        self._oom.close()
        if self._bar is not None:
            self._bar.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code)
        for f in (self._jsonl, self._eval_jsonl):
            if f is not None:
                f.close()
        self._jsonl = self._eval_jsonl = None
        if self.is_main and print_summary and self.progress != "off":
            print(summary_table(self.last_metrics, self.last_eval), flush=True)

    def __enter__(self) -> "Telemetry":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(exit_code=1 if exc_type else 0)
