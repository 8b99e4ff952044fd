"""The run directory's layout, named once.

A training run writes, under ``run.out``::

    RUN/config.yaml           the resolved config (a resumed run must keep what was learned under it)
    RUN/metrics.jsonl         one record per training log step; validation records in eval_metrics.jsonl,
                              the environment of each (re)start in environment.jsonl
    RUN/checkpoints/          resumable checkpoints (step_<N>/), newest intact one resumed
    RUN/best/, RUN/final/     exports: model.pt (+ model.safetensors, config.json), loadable without the trainer
    RUN/eval/                 the evaluation report of an export (report.json, figures)
    RUN/report/               the rendered training report (summary.md, figures)
    RUN/profile/, RUN/memory/ profiler traces and OOM memory snapshots
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twinbrain.weights import CONFIG_FILE, WEIGHTS_FILE

EXPORT_FILE = "model.pt"
BEST, FINAL = "best", "final"                              # the two exports of a run
EVAL_REPORT = "report.json"                                # an evaluation's report, in RUN/eval/ by default
EXPORT_FILES = (EXPORT_FILE, WEIGHTS_FILE, CONFIG_FILE)    # what an export folder holds


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (nothing is created or read)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_export(cls, model_file: str | Path) -> "RunDir":
        """The run that holds the export ``RUN/<name>/model.pt``."""
        return cls(Path(model_file).parent.parent)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def eval_metrics(self) -> Path:
        return self.root / "eval_metrics.jsonl"

    @property
    def environment(self) -> Path:
        return self.root / "environment.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def export(self, name: str) -> Path:
        """Folder of the export ``name`` (``best`` | ``final``)."""
        return self.root / name

    def model(self, name: str = BEST) -> Path:
        """``RUN/<name>/model.pt``."""
        return self.export(name) / EXPORT_FILE

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_report(self) -> Path:
        return self.eval / EVAL_REPORT

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def profile(self) -> Path:
        return self.root / "profile"

    @property
    def memory(self) -> Path:
        return self.root / "memory"
