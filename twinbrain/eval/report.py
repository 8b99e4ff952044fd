"""``twinbrain report RUN_DIR``: training curves to PNG and a short Markdown summary.

Reads ``RUN_DIR/metrics.jsonl`` (train, eval and env records written by
``twinbrain.train.telemetry``) and, when present, ``RUN_DIR/eval/report.json`` (written by
``twinbrain evaluate``).  Every plot and table is built from the keys actually present, so a
run with fewer metrics (CPU, no eval yet, older version) still gets a report.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from twinbrain.config import flatten  # noqa: E402
from twinbrain.rundir import RunDir  # noqa: E402

THROUGHPUT_KEYS = ("windows_per_s", "node_steps_per_s", "windows_per_s_per_device",
                   "node_steps_per_s_per_device", "tflops_per_s", "mfu", "step_time_s", "data_share")
MEMORY_KEYS = ("mem_peak_gib", "mem_reserved_peak_gib", "mem_peak_pct", "mem_reserved_peak_pct",
               "rss_gib", "rss_peak_gib", "alloc_retries", "ooms")
BOOKKEEPING = ("step", "kind", "time", "elapsed_s")
LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse", "crps", "nll", "error")
MAX_PANELS = 12


def load_metrics(path: Path) -> tuple[list[dict], list[dict], dict]:
    """``(train_records, eval_records, env)`` from a metrics.jsonl.

    Tolerates a torn last line (a killed job) and resumes: when a record's step is not
    after the previous one of its kind, the job restarted from a checkpoint and the
    earlier records from that step on are dropped (they were recomputed).
    """
    train: list[dict] = []
    evals: list[dict] = []
    env: dict = {}
    # Validation and environment records live beside metrics.jsonl (one record per log step there).
    lines: list[str] = []
    layout = RunDir(path.parent)
    for f in (layout.environment, path, layout.eval_metrics):
        if f.is_file():
            lines += f.read_text(encoding="utf-8").splitlines()
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        kind = rec.get("kind", "train")
        if kind == "env":  # one per (re)start; the latest wins key by key
            env.update(rec)
            continue
        seq = evals if kind == "eval" else train
        while seq and seq[-1]["step"] >= rec["step"]:
            seq.pop()
        seq.append(rec)
    return train, evals, env


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if _numeric(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _keys(records: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in BOOKKEEPING and _numeric(v):
                seen.setdefault(k, None)
    return list(seen)


def _plot(path: Path, title: str, panels: list[tuple[str, list[str], bool]], records: list[dict],
          marker: str = "") -> Path | None:
    """One figure, one panel per ``(panel title, keys, log-y)``; None when nothing to draw."""
    drawn = []
    for name, keys, logy in panels:
        lines = [(k, *_series(records, k)) for k in keys]
        lines = [ln for ln in lines if ln[1]]
        if lines:
            drawn.append((name, lines, logy))
    drawn = drawn[:MAX_PANELS]
    if not drawn:
        return None
    ncols = 1 if len(drawn) == 1 else 2
    nrows = math.ceil(len(drawn) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (name, lines, logy) in zip(axes.flat, drawn):
        for key, xs, ys in lines:
            ax.plot(xs, ys, marker or "-", label=key, linewidth=1.2, markersize=4)
        if logy and all(y > 0 for _, _, ys in lines for y in ys):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1 or lines[0][0] != name:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_validation(path: Path, evals: list[dict]) -> Path | None:
    """Held-out forecast R² over training, one panel per modality: TwinBrain (solid) and persistence
    (dashed) overlaid in one colour per horizon, beside the validation losses."""
    keys = _keys(evals)
    mods = sorted({k.split("/")[1] for k in keys if k.startswith("val/") and "/forecast_r2_h" in k})
    losses = [k for k in keys if k.startswith("val/loss")]
    if not mods and not losses:
        return None
    n = len(mods) + int(bool(losses))
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.6), squeeze=False, layout="constrained")
    for ax, m in zip(axes.flat, mods):
        hs = sorted(int(k.rsplit("_h", 1)[1]) for k in keys if k.startswith(f"val/{m}/forecast_r2_h"))
        for i, h in enumerate(hs):
            colour = plt.cm.viridis(i / max(len(hs) - 1, 1))
            for name, style in (("forecast", "o-"), ("persistence", "x--")):
                xs, ys = _series(evals, f"val/{m}/{name}_r2_h{h}")
                if xs:
                    ax.plot(xs, ys, style, color=colour, markersize=4, linewidth=1.2,
                            label=f"h{h} {'TwinBrain' if name == 'forecast' else 'persistence'}")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(f"{m}: held-out forecast R² (solid TwinBrain, dashed persistence)", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("R² (validation subjects)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    if losses:
        ax = axes.flat[len(mods)]
        for k in losses:
            xs, ys = _series(evals, k)
            ax.plot(xs, ys, "o-", label=k.removeprefix("val/"), markersize=4, linewidth=1.2)
        if all(y > 0 for k in losses for y in _series(evals, k)[1]):
            ax.set_yscale("log")
        ax.set_title("validation losses", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("validation")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_eval_report(path: Path, flat: dict[str, Any]) -> Path | None:
    """Forecast skill (and R2) from eval/report.json: per-horizon lists as lines, scalars as bars."""
    skill = {k: v for k, v in flat.items() if "skill" in k.lower() or "r2" in k.lower()}
    curves = {k: v for k, v in skill.items() if isinstance(v, list) and v and all(_numeric(x) for x in v)}
    bars = {k: v for k, v in skill.items() if _numeric(v)}
    if not curves and not bars:
        return None
    n = int(bool(curves)) + int(bool(bars))
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 3.8), squeeze=False)
    ax_iter = iter(axes.flat)
    if curves:
        ax = next(ax_iter)
        horizons = flat.get("horizons") if isinstance(flat.get("horizons"), list) else None
        for k, ys in list(curves.items())[:MAX_PANELS]:
            xs = horizons if horizons and len(horizons) == len(ys) else list(range(1, len(ys) + 1))
            ax.plot(xs, ys, "o-", label=k, markersize=4)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("horizon (steps)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title("forecast skill / R2 by horizon", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if bars:
        ax = next(ax_iter)
        items = list(bars.items())[:30]
        ax.barh([k for k, _ in items], [v for _, v in items])
        ax.axvline(0.0, color="grey", linewidth=0.8)
        ax.tick_params(axis="y", labelsize=6)
        ax.set_title("evaluation scores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v[:12]) + (", ..." if len(v) > 12 else "") + "]"
    return "-" if v is None else str(v)


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows]


def _read_eval_report(path: Path) -> dict[str, Any]:
    """``eval/report.json`` flattened to dotted keys; ``{}`` when absent, one ``error`` entry when unreadable."""
    flat: dict[str, Any] = {}
    if path.is_file():
        try:
            flat = flatten(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, OSError):
            flat = {"error": f"could not read {path}"}
    return flat


def _render_plots(out: Path, train: list[dict], evals: list[dict], flat: dict[str, Any]) -> dict[str, Path | None]:
    """Every figure of the report under ``out`` (None where there is nothing to plot), by section name."""
    tkeys = _keys(train)
    loss_terms = [k for k in tkeys if k.startswith(("loss/", "loss_"))]
    optim = {"learning rate": [k for k in tkeys if k == "lr" or k.startswith("lr/")],
             "gradient norm": [k for k in tkeys if k.startswith("grad_norm")],
             "balancer weights": [k for k in tkeys if k.startswith("balancer/")]}
    grouped = set(loss_terms) | {"loss"} | set(THROUGHPUT_KEYS) | set(MEMORY_KEYS) | {
        k for ks in optim.values() for k in ks}
    other = [k for k in tkeys if k not in grouped]
    return {
        "loss": _plot(out / "loss.png", "training loss", [("loss", ["loss"], True),
                                                           ("loss terms", loss_terms, True)], train),
        "optimisation": _plot(out / "optim.png", "optimisation", [(n, ks, n == "gradient norm")
                                                                 for n, ks in optim.items()], train),
        "validation": _plot_validation(out / "validation.png", evals),
        "throughput": _plot(out / "throughput.png", "throughput", [
            ("windows / s (total)", ["windows_per_s"], False),
            ("node-steps / s (total)", ["node_steps_per_s"], False),
            ("achieved matmul TFLOP/s per device", ["tflops_per_s"], False), ("MFU", ["mfu"], False),
            ("step time (s)", ["step_time_s"], False), ("data-loading share", ["data_share"], False)], train),
        "memory": _plot(out / "memory.png", "memory", [
            ("device peak (GiB)", ["mem_peak_gib", "mem_reserved_peak_gib"], False),
            ("device peak (% capacity)", ["mem_peak_pct", "mem_reserved_peak_pct"], False),
            ("host RSS (GiB)", ["rss_gib", "rss_peak_gib"], False),
            ("allocator retries / OOMs", ["alloc_retries", "ooms"], False)], train),
        "other": _plot(out / "other.png", "other training metrics", [(k, [k], False) for k in other], train),
        "evaluation": _plot_eval_report(out / "eval_report.png", flat) if flat else None,
    }


def _summary_lines(name: str, train: list[dict], evals: list[dict], env: dict, flat: dict[str, Any],
                   plots: dict[str, Path | None]) -> list[str]:
    """The Markdown of ``summary.md`` (one list item a line): environment, final training metrics, the
    validation table (last and best), the evaluation report and the plots."""
    md = [f"# TwinBrain run report: `{name}`", ""]
    if env:
        md += [f"- device: {env.get('device_name', '?')} x {env.get('world_size', '?')} "
               f"({env.get('backend') or 'single'}), torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}",
               f"- run id: `{env.get('run_id', '?')}`"]
    if train:
        last = train[-1]
        md += [f"- steps logged: {train[0]['step']} .. {last['step']} ({len(train)} records)"]
        if _numeric(last.get("elapsed_s")):
            md += [f"- wall time (last segment): {last['elapsed_s'] / 60:.1f} min"]
        md += ["", "## Final training metrics", ""]
        md += _table([(k, _fmt(last[k])) for k in last if k not in ("kind", "time")], ("metric", "value"))
    else:
        md += ["", "No training records in metrics.jsonl yet."]
    if evals:
        md += ["", "## Validation", ""]
        rows = []
        for k in _keys(evals):
            xs, ys = _series(evals, k)
            lower = any(w in k.lower() for w in LOWER_IS_BETTER)
            best = (min if lower else max)(zip(ys, xs))
            rows.append((k, _fmt(ys[-1]), f"{_fmt(best[0])} @ {best[1]} ({'min' if lower else 'max'})"))
        md += _table(rows, ("metric", f"last (step {evals[-1]['step']})", "best"))
    if flat:
        md += ["", "## Evaluation report (`eval/report.json`)", ""]
        md += _table([(k, _fmt(v)) for k, v in list(flat.items())[:80]], ("key", "value"))
        if len(flat) > 80:
            md += ["", f"({len(flat) - 80} more entries in eval/report.json)"]
    made = {k: p for k, p in plots.items() if p is not None}
    if made:
        md += ["", "## Plots", ""]
        md += [f"### {k}\n\n![{k}]({p.name})\n" for k, p in made.items()]
    return md


def render_report(run_dir: str | Path) -> Path:
    """Render ``RUN_DIR/report/*.png`` and ``RUN_DIR/report/summary.md``; returns the summary path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"report: run directory {run_dir} does not exist; pass the run.out of a training run")
    layout = RunDir(run_dir)
    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    train, evals, env = load_metrics(layout.metrics)
    flat = _read_eval_report(layout.eval_report)
    plots = _render_plots(out, train, evals, flat)
    summary = out / "summary.md"
    summary.write_text("\n".join(_summary_lines(run_dir.name, train, evals, env, flat, plots)) + "\n",
                       encoding="utf-8")
    return summary
