"""On-demand profiling: a torch.profiler trace of a few steps, a CUDA memory snapshot on OOM.

Both are off the hot path unless asked for in the config (``logging.profile_steps``,
``logging.memory_snapshot_on_oom``).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)

PROFILE_WAIT_STEPS = 2   # skip the first steps after start (allocator growth, compilation)
MAX_OOM_SNAPSHOTS = 3    # later OOMs repeat the first; each snapshot is large


class StepProfiler:
    """Records ``steps`` training steps with torch.profiler into ``out_dir``.

    The trace starts ``PROFILE_WAIT_STEPS`` + 1 warm-up steps after the first wrapped step,
    so start-up costs do not dominate it, and is written as
    ``trace_rank{r}_step{n}.json`` (chrome://tracing, https://ui.perfetto.dev) plus an
    operator table ``ops_rank{r}.txt``.  CPU activity always; CUDA kernels when on a GPU.
    """

    def __init__(self, steps: int, out_dir: Path, rank: int, cuda: bool):
        self.left = int(steps)
        self.out_dir, self.rank, self.cuda = Path(out_dir), rank, cuda
        self._prof: Any = None
        self._seen = 0

    @contextlib.contextmanager
    def wrap(self) -> Iterator[None]:
        if self.left <= 0:
            yield
            return
        if self._prof is None:
            self._prof = self._start()
        try:
            yield
        finally:
            self._prof.step()
            self._seen += 1
            if self._seen >= PROFILE_WAIT_STEPS + 1 + self.left:
                self.stop()

    def _start(self) -> Any:
        from torch.profiler import ProfilerActivity, profile, schedule

        self.out_dir.mkdir(parents=True, exist_ok=True)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])

        def ready(prof: Any) -> None:
            path = self.out_dir / f"trace_rank{self.rank}_step{prof.step_num}.json"
            prof.export_chrome_trace(str(path))
            sort = "cuda_time_total" if self.cuda else "cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=40)
            (self.out_dir / f"ops_rank{self.rank}.txt").write_text(table)
            log.info("profiler trace written to %s", path)

        prof = profile(activities=acts, schedule=schedule(wait=PROFILE_WAIT_STEPS, warmup=1, active=self.left,
                                                          repeat=1),
                       on_trace_ready=ready, record_shapes=True, profile_memory=True)
        prof.start()
        return prof

    def stop(self) -> None:
        """Finish early (end of training inside the window writes what was recorded)."""
        if self._prof is not None:
            self._prof.stop()
        self._prof, self.left = None, 0


class OOMSnapshots:
    """CUDA allocator history, dumped as a snapshot when memory runs out.

    Recording keeps Python stacks only (C++ unwinding on every allocation costs far more).
    The dump is wired to the allocator's OOM observer, so it happens before the exception
    unwinds the stack; ``dump()`` can also be called by hand.  No-op on CPU.
    """

    def __init__(self, enabled: bool, out_dir: Path, rank: int, cuda: bool):
        self.out_dir, self.rank = Path(out_dir), rank
        self.active = bool(enabled and cuda)
        self.dumps = 0
        self._last: Path | None = None
        self._unclaimed = False   # the observer dumped; the trainer's except-handler call must not repeat it
        if not self.active:
            return
        torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
        attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
        if attach is not None:
            attach(self._observe)

    def _observe(self, *_: object) -> None:
        if self.dump() is not None:
            self._unclaimed = True

    def dump(self) -> Path | None:
        """Write ``oom_rank{r}_{k}.pickle`` (view at https://pytorch.org/memory_viz); None if off.

        If the allocator's observer already dumped this OOM, returns that file instead.
        """
        if self._unclaimed:
            self._unclaimed = False
            return self._last
        if not self.active or self.dumps >= MAX_OOM_SNAPSHOTS:
            return None
        self.dumps += 1
        path = self.out_dir / f"oom_rank{self.rank}_{self.dumps}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        log.warning("CUDA out of memory: snapshot written to %s", path)
        self._last = path
        return path

    def close(self) -> None:
        if self.active:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.active = False
