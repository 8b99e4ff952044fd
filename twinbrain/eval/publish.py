"""Results into the training run's wandb notebook: figures as images, tables as tables, best values as
summaries. The run is re-opened by the id the training recorded (``RUN/environment.jsonl``), offline
unless the run's ``logging.wandb`` / an API key says otherwise, so nothing here needs the network."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from twinbrain.train.tracker import reopen_run

log = logging.getLogger(__name__)


def forecast_table(report: dict, m: str, labels: dict[str, str]) -> tuple[list[str], list[list]]:
    """``(columns, rows)`` in long form (one row per horizon x predictor): horizon, predictor, label,
    R², Pearson r, whether it is that horizon's strongest baseline, and TwinBrain's skill against it."""
    f = report["forecast"][m]
    cols = ["horizon", "predictor", "label", "r2", "pearson", "strongest_baseline", "model_skill_vs_strongest"]
    rows = []
    for i, h in enumerate(f["horizons"]):
        best = f.get("strongest", [None] * len(f["horizons"]))[i]
        sk = f["skill"].get("strongest", [None] * len(f["horizons"]))[i]
        rows.append([h, "model", "TwinBrain", f["model"]["r2"][i], f["model"]["pearson"][i], False, sk])
        rows += [[h, k, labels.get(k, k), v["r2"][i], v["pearson"][i], k == best, None]
                 for k, v in f["baselines"].items()]
    return cols, rows


def validity_table(report: dict) -> tuple[list[str], list[list]] | None:
    """EC scores of the validity section (simulated cohorts), or None."""
    v = report.get("validity", {})
    ec = v.get("effective_connectivity") if v.get("available") else None
    if not ec:
        return None
    cols = ["EC from", "r vs coupling", "AUROC edges", "r vs Δ-BOLD response", "AUROC top-quartile response"]
    rows = [[k, s.get("coupling_r"), s.get("coupling_auroc"), s.get("perturb_r"), s.get("perturb_auroc")]
            for k, s in ec.items() if isinstance(s, dict) and "coupling_r" in s]
    return cols, rows


def summaries(report: dict) -> dict:
    out = {}
    for m, f in report.get("forecast", {}).items():
        for i, h in enumerate(f["horizons"]):
            out[f"eval/{m}/r2_h{h}"] = f["model"]["r2"][i]
            if "strongest" in f:
                out[f"eval/{m}/strongest_h{h}"] = f["strongest"][i]
                out[f"eval/{m}/skill_vs_strongest_h{h}"] = f["skill"]["strongest"][i]
    return out


def publish_evaluation(report: dict, figures: dict[str, Path], run_dir: Path, cfg, step: int,
                       labels: dict[str, dict[str, str]], mode: str | None = None) -> str | None:
    """Log an evaluation to the training run's wandb run; returns its id (None when wandb is off)."""
    lcfg = dataclasses.replace(cfg.logging, wandb=mode) if mode else cfg.logging
    run = reopen_run(run_dir, lcfg)
    if run is None:
        return None
    try:
        split = report["protocol"]["split"]
        tables = {f"eval/{split}/{m}_forecast_r2": forecast_table(report, m, labels.get(m, {}))
                  for m in report.get("forecast", {})}
        vt = validity_table(report)
        if vt:
            tables[f"eval/{split}/validity_ec"] = vt
        run.log_media(step, images={f"eval/{split}/{k}": p for k, p in figures.items()}, tables=tables)
        run.log_summary(summaries(report))
        return run.run_id
    finally:
        run.finish()


def publish_report(run_dir: Path, images: dict[str, Path], logging_cfg, step: int) -> str | None:
    """Log the report sheets of ``twinbrain report`` as images of the training run."""
    run = reopen_run(run_dir, logging_cfg)
    if run is None:
        return None
    try:
        run.log_media(step, images={f"report/{k}": p for k, p in images.items()})
        return run.run_id
    finally:
        run.finish()
