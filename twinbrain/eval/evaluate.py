"""``twinbrain evaluate``: a trained twin against baselines on held-out subjects, plus twin validity.

    report = evaluate_checkpoint(Path("RUN/best/model.pt"), split="test")    # -> RUN/eval/report.{json,md}

Steps: load the export strictly (:func:`twinbrain.twin.loader.load_export`, rebuilt from its own config);
rebuild the data exactly as the run did (``DataModule(cfg).setup()``) and refuse to go on unless the
recordings, maps, split and normalisation statistics equal the ones saved in the checkpoint and no
evaluated span overlaps a span its statistics were computed on; run the forecast protocol of
:mod:`twinbrain.eval.forecast_eval` (model and baselines on the same windows and targets); on a simulated
cohort add the validity section of :mod:`twinbrain.eval.twin_validity`. Only ``--eval.*`` (and
``--data.num_workers``) may be overridden: the model and its data are fixed by the checkpoint.
See docs/EVALUATION.md for what every number means.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from twinbrain.config import LOCATION_KEYS, ConfigError, fixed_keys, flatten, parse_overrides, with_overrides
from twinbrain.data.module import DataModule
from twinbrain.data.source import cohort_config
from twinbrain.eval.figures import plot_forecast_example, plot_horizons
from twinbrain.eval.forecast_eval import evaluate_forecasts
from twinbrain.eval.publish import publish_evaluation
from twinbrain.eval.twin_validity import twin_validity
from twinbrain.rundir import EVAL_REPORT, RunDir
from twinbrain.scoring.linear import prior_terms

log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """The checkpoint cannot be evaluated honestly as it is; the message names the file, the value, the fix."""


# ---------------------------------------------------------------- config and data

def apply_overrides(cfg, overrides: list[str] | None):
    """The checkpoint's ``Config`` with ``--eval.*`` / ``--data.num_workers`` overrides applied (validated)."""
    if not overrides:
        return cfg
    values = parse_overrides(list(overrides))
    bad = fixed_keys(flatten(values), "evaluate")
    if bad:
        raise ConfigError(f"evaluate accepts only --eval.* and data-location overrides ({', '.join(LOCATION_KEYS)}), "
                          f"got {bad}: the model, data, graph and split are fixed by the checkpoint (train a new "
                          f"run to change them)")
    return with_overrides(cfg, values)


def _same_spans(a: list, b: list) -> bool:
    return len(a) == len(b) and all(int(x[0]) == int(y[0]) and np.allclose(x[1:], y[1:], atol=1e-6)
                                    for x, y in zip(a, b))


def split_differences(saved: dict, rebuilt: dict) -> list[str]:
    """Names of the parts of two ``Split.to_dict()`` that differ ([] when they are the same split)."""
    diff = [n for n in ("train", "val", "test") if not _same_spans(saved.get(n, []), rebuilt.get(n, []))]
    calib_a, calib_b = saved.get("calib", {}), rebuilt.get("calib", {})
    if set(calib_a) != set(calib_b) or any(not np.allclose(calib_a[k], calib_b[k], atol=1e-6) for k in calib_a):
        diff.append("calib")
    subj_a, subj_b = saved.get("subjects", {}), rebuilt.get("subjects", {})
    diff += [f"subjects[{n}]" for n in sorted(set(subj_a) | set(subj_b))
             if sorted(subj_a.get(n, [])) != sorted(subj_b.get(n, []))]
    return diff


def _same_stats(a: dict, b: dict) -> bool:
    def same(x, y):
        return x["source"] == y["source"] and all(np.allclose(x[k], y[k], rtol=1e-5, atol=1e-8)
                                                  for k in ("fmri_mean", "fmri_std", "eeg_mean", "eeg_std"))
    return set(a["per_rec"]) == set(b["per_rec"]) and same(a["group"], b["group"]) and \
        all(same(a["per_rec"][k], b["per_rec"][k]) for k in a["per_rec"])


def check_data(dm: DataModule, meta: dict, path, split: str) -> dict:
    """Refuse (:class:`EvaluationError`) unless the rebuilt data are the run's data and ``split`` is clean.

    Checks: recordings, subject/session maps and node slots equal the checkpoint's; the rebuilt split
    equals the saved one; the normalisation statistics equal the saved ones (training spans, calibration
    spans); no evaluated span overlaps a training span or a calibration span of its recording; with
    ``data.split == 'subject'`` no subject is in two splits. Returns a summary of what was verified.
    """
    got = dm.metadata()
    for key in ("recordings", "subject_map", "session_map", "n_fmri_slots", "n_eeg_slots", "samples_per_tr",
                "region_names", "channel_names", "cohort_fingerprint"):
        if key in meta and got[key] != meta[key]:
            raise EvaluationError(f"{path}: the data rebuilt from the checkpoint's config differ from the "
                                  f"training data ({key}: saved {str(meta[key])[:120]}, rebuilt "
                                  f"{str(got[key])[:120]}); point data.* at the cohort the model was trained on")
    if "split" not in meta:
        raise EvaluationError(f"{path}: the checkpoint has no saved split, so held-out subjects cannot be "
                              f"verified; re-export the model from its run (RUN/best/model.pt)")
    diff = split_differences(meta["split"], got["split"])
    if diff:
        raise EvaluationError(f"{path}: the split saved in the checkpoint does not match the split rebuilt from "
                              f"its config (differs in {diff}; saved subjects {meta['split'].get('subjects')}, "
                              f"rebuilt {got['split'].get('subjects')}). Evaluating would mix training and "
                              f"held-out data; use the config and data the model was trained with")
    if "norm_stats" in meta and not _same_stats(meta["norm_stats"], got["norm_stats"]):
        raise EvaluationError(f"{path}: normalisation statistics recomputed from the data differ from the saved "
                              f"ones; the recordings changed since training (re-simulated or re-prepared?)")
    sp = dm.split
    train_by_rec: dict[int, list] = {}
    for i, s, e in sp.train:
        train_by_rec.setdefault(i, []).append((s, e))
    for i, s, e in sp.spans(split):
        used = ([tuple(sp.calib[i])] if i in sp.calib else []) + (train_by_rec.get(i, []) if split != "train" else [])
        clash = [(a, b) for a, b in used if a < e - 1e-9 and s < b - 1e-9]
        if clash:
            raise EvaluationError(f"{path}: evaluated span {s:.1f}-{e:.1f} s of {dm.cohort.recordings[i].key} "
                                  f"overlaps span(s) {clash} used for training or normalisation")
    subj = sp.subjects
    shared = {} if dm.cfg.data.split != "subject" else \
        {f"{a}&{b}": sorted(set(subj.get(a, [])) & set(subj.get(b, [])))
         for a, b in (("train", "val"), ("train", "test"), ("val", "test"))}
    if any(shared.values()):
        raise EvaluationError(f"{path}: splits share subjects {shared}; held-out subjects must be unseen")
    return {"split_matches_checkpoint": True, "norm_stats_match_checkpoint": "norm_stats" in meta,
            "subject_split": dm.cfg.data.split == "subject", "subjects": subj,
            "norm_sources": sorted({dm.stats.per_rec[i].source for i, _, _ in sp.spans(split)})}


# ---------------------------------------------------------------- the report

def _jsonable(x):
    """NaN/inf -> None, numpy -> Python, recursively."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def baseline_label(name: str, tuning: dict | None = None) -> str:
    """Report label of a baseline: ``'ridge VAR(2), α=100, val-tuned'``; fixed ones keep their key."""
    if not tuning:
        return name
    p = tuning.get("order")
    if name == "mlp":
        return f"MLP({p}) iterated, stopped at {tuning['best_step']}/{tuning['max_steps']} steps"
    if name == "svar" and tuning.get("core") == "transfer":
        return f"transfer flow dx/dt = c - Dx + W tanh({tuning['slope']:g}x), α={tuning['alpha']:g}, val-tuned"
    if name == "svar":
        return f"ridge VAR({p}), α own {tuning['alpha']:g}{prior_terms(tuning)} / cross {tuning['alpha_cross']:g}, val-tuned"
    base = {"ar1": "AR(1) per node", "ar": f"AR({p}) per node", "var": f"ridge VAR({p})"}.get(name, name)
    return f"{base}, α={tuning['alpha']:g}, val-tuned"


def render_markdown(report: dict) -> str:
    """The Markdown summary of a report dict: protocol, per-modality tables, reconstruction, validity."""
    p = report["protocol"]
    lines = [f"# TwinBrain evaluation: {report['checkpoint']}", "",
             f"Split **{p['split']}** (subjects {', '.join(p['subjects']) or 'n/a'}), {p['n_windows']} of "
             f"{p['n_windows_in_split']} windows; window {p['window_trs']} TRs, context {p['context_trs']} TRs "
             f"(TR {p['tr_s']} s); step {report.get('step')}; {report['created']}; {report['machine']}.", ""]
    for m in report["forecast"]:
        f = report["forecast"][m]
        hs = f["horizons"]
        unit = "TR" if m == "fmri" else f"latent step = {p['eeg_stride']} samples"
        lines += [f"## {m.upper()} forecast R² (horizon in {unit}; n = {int(f['model']['n'][0])} per horizon)", "",
                  "| predictor | " + " | ".join(f"h={h}" for h in hs) + " |",
                  "|---|" + "---|" * len(hs)]
        tune = p.get("baseline_tuning", {}).get(m, {})
        rows = [("**TwinBrain**", f["model"]["r2"])]
        rows += [(baseline_label(k, tune.get(k)), v["r2"]) for k, v in f["baselines"].items()]
        rows += [(f"skill vs {k}" + (" baseline" if k == "strongest" else ""), v) for k, v in f["skill"].items()]
        lines += [f"| {name} | " + " | ".join(_fmt(v) for v in vals) + " |" for name, vals in rows]
        if "strongest" in f:
            lines.append("| strongest baseline | " + " | ".join(f["strongest"]) + " |")
        lines += ["", "Pearson r: TwinBrain " + ", ".join(_fmt(v) for v in f["model"]["pearson"]) + "; " +
                  "; ".join(f"{k} " + ", ".join(_fmt(x) for x in v["pearson"]) for k, v in f["baselines"].items())]
        if "crps" in f["model"]:
            lines += ["", "CRPS " + ", ".join(_fmt(v) for v in f["model"]["crps"]) + "; 50% / 90% coverage " +
                      ", ".join(f"{_fmt(a, 2)}/{_fmt(b, 2)}" for a, b in zip(f["model"]["coverage_50"],
                                                                           f["model"]["coverage_90"]))]
        lines.append("")
    rec, cau = report["reconstruction"], report["causality"]
    lines += ["## Reconstruction and causality", "",
              "| modality | reconstruction R² | max abs(full-window - context-only) forecast |", "|---|---|---|"]
    lines += [f"| {m} | {_fmt(rec[m]['r2'])} | {cau[m]:.2e} |" for m in rec]
    v = report["validity"]
    lines += ["", "## Twin validity (ground truth)", ""]
    if not v.get("available"):
        lines.append(f"Not available: {v.get('reason')}.")
    else:
        ec = v["effective_connectivity"]
        lines += [f"Effective connectivity by virtual perturbation (horizon 1..{v['horizon']}, "
                  f"{v['n_windows']} windows; stimulated regions {v['perturb_regions']}):", "",
                  "| EC from | r vs coupling | AUROC edges | r vs Δ-BOLD response | AUROC top-quartile response |",
                  "|---|---|---|---|---|"]
        labels = {"model": "TwinBrain", "linear_twin": "linear twin (VAR(1))", "input_fc_graph": "input FC graph"}
        for name, label in labels.items():
            if name in ec:
                s = ec[name]
                lines.append(f"| {label} | "
                             f"{_fmt(s['coupling_r'])} | {_fmt(s['coupling_auroc'])} | {_fmt(s['perturb_r'])} | "
                             f"{_fmt(s['perturb_auroc'])} |")
        if not ec.get("available"):
            lines.append(f"\nTwinBrain EC skipped: {ec.get('reason')}.")
        else:
            lines.append(f"\nr(TwinBrain EC, input FC graph), off-diagonal: {_fmt(ec['model_vs_input_graph_r'])}")
        q, emb = v["modularity"], v["embeddings"]
        lines += ["", f"- model FC (one-step forecasts) vs empirical FC: r = {_fmt(v['fc']['model_vs_empirical_r'])}",
                  f"- node embeddings vs true modules (k-means, k = {emb['k']}): ARI {_fmt(emb['ari'])}, "
                  f"NMI {_fmt(emb['nmi'])}",
                  f"- modularity Q w.r.t. true modules: |EC| {_fmt(q['ec'])}, learned coupling "
                  f"{_fmt(q['learned_adjacency'])}, input FC graph {_fmt(q['input_fc_graph'])}, true coupling "
                  f"{_fmt(q['true_coupling'])}"]
    return "\n".join(lines) + "\n"


def _machine(device: torch.device) -> str:
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    return f"{platform.system()} {platform.machine()}, {dev}, torch {torch.__version__}"


def evaluate_checkpoint(checkpoint: Path, split: str | None = None, out_dir: Path | None = None,
                        overrides: list[str] | None = None, *, device=None, mlp: bool = True,
                        validity: bool = True, batch_size: int | None = None, wandb: str | None = None) -> dict:
    """Evaluate an export and write ``out_dir/report.json`` and ``out_dir/report.md``.

    Args:
        checkpoint: ``RUN/best/model.pt`` (or a folder holding it). split: 'test' (default: ``eval.split``),
            'val' or 'train'. out_dir: default ``RUN/eval`` (the run folder of the checkpoint).
        overrides: dotted ``--eval.*`` overrides, e.g. ``['--eval.max_windows', '20']``.
        device: None = CUDA if available. mlp: include the MLP baseline. validity: run the validity
            section when the cohort has ground truth. batch_size: windows per pass (``train.batch_size``).
        wandb: 'offline' / 'online' / 'disabled' to override the run's ``logging.wandb`` for logging the
            report, figures and tables into the training run's wandb run (None: the run's setting).
    Returns the report dict (what ``report.json`` holds) plus ``'markdown'``.
    """
    from twinbrain.twin.loader import load_export

    t0 = time.perf_counter()
    lm = load_export(checkpoint, device)
    cfg = apply_overrides(lm.config, overrides)
    split = split or cfg.eval.split
    if split not in ("train", "val", "test"):
        raise EvaluationError(f"unknown split '{split}'; use test (held-out subjects), val or train")
    moved = any(k.startswith("data.") for k in flatten(parse_overrides(list(overrides or []))))
    dm = DataModule(cohort_config(cfg, lm.metadata, overridden=moved)).setup()
    checks = check_data(dm, lm.metadata, lm.path, split)
    model = lm.model.eval()
    res = evaluate_forecasts(model, dm, split, cfg, device=lm.device, mlp=mlp,
                             batch_size=batch_size or cfg.train.batch_size)
    fc, example = res.pop("fc"), res.pop("example")
    if validity:
        val = twin_validity(model, cfg, lm.metadata, dm, split, res["protocol"]["window_index"], fc,
                            horizon=max(cfg.eval.horizons), path=lm.path)
    else:
        val = {"available": False, "reason": "disabled (validity=False)"}
    report = {"checkpoint": str(lm.path), "step": lm.step, "split": split,
              "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": _machine(lm.device), "data_checks": checks, **res, "validity": val}
    report["runtime_s"] = round(time.perf_counter() - t0, 2)
    report = _jsonable(report)
    out = Path(out_dir) if out_dir else RunDir.of_export(lm.path).eval
    out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(report)
    (out / EVAL_REPORT).write_text(json.dumps(report, indent=1, allow_nan=False))
    (out / "report.md").write_text(md)
    labels = {m: {k: baseline_label(k, report["protocol"].get("baseline_tuning", {}).get(m, {}).get(k))
                  for k in f["baselines"]} for m, f in report["forecast"].items()}
    figures = evaluation_figures(report, example, out, lm.metadata, labels)
    run_id = publish_evaluation(report, figures, RunDir.of_export(lm.path).root, cfg, lm.step or 0, labels, mode=wandb)
    log.info("evaluation report written to %s (%.1f s)%s", out, report["runtime_s"],
             f"; logged to wandb run {run_id}" if run_id else "")
    return {**report, "markdown": md, "out_dir": str(out), "figures": {k: str(p) for k, p in figures.items()},
            "wandb_run_id": run_id}


def evaluation_figures(report: dict, example: dict, out: Path, meta: dict, labels: dict) -> dict[str, Path]:
    """``out/horizons.png`` (every predictor by horizon) and ``out/forecast_<m>.png`` (one window)."""
    figs = {}
    p = plot_horizons(report, out / "horizons.png", labels)
    if p:
        figs["horizons"] = p
    prot = report["protocol"]
    for m, ex in example.items():
        period = prot["tr_s"] if m == "fmri" else prot["tr_s"] / prot["samples_per_tr"]
        names = meta.get("region_names" if m == "fmri" else "channel_names")
        f = report["forecast"][m]
        strongest = f.get("strongest", [None])[0]
        figs[f"forecast_{m}"] = plot_forecast_example(ex, out / f"forecast_{m}.png", period, m, names,
                                                      strongest=strongest, labels=labels.get(m))
    return figs
