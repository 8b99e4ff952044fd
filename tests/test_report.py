"""`twinbrain report`: curves to PNG and summary.md from metrics.jsonl (+ eval/report.json)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from twinbrain.config import LoggingConfig
from twinbrain.eval.report import load_metrics, render_report
from twinbrain.train.telemetry import Telemetry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path: Path, recs: list[dict], torn_tail: bool = False) -> None:
    text = "".join(json.dumps(r) + "\n" for r in recs)
    path.write_text(text + ('{"kind": "train", "step": 9' if torn_tail else ""))


def synthetic(run: Path) -> None:
    run.mkdir(parents=True)
    recs: list[dict] = [{"kind": "env", "step": 0, "device_name": "NVIDIA H100 80GB HBM3", "world_size": 8,
                         "backend": "fsdp2", "torch": "2.13.0", "cuda": "12.8", "run_id": "abcd1234"}]
    for step in range(10, 110, 10):
        recs.append({"kind": "train", "step": step, "time": 1e9 + step, "elapsed_s": step * 2.0,
                     "loss": 2.0 / step, "loss/recon_fmri": 1.0 / step, "loss/forecast_eeg": 0.5 / step,
                     "balancer/recon_fmri": 1.0, "lr/base": 1e-3, "lr/emb": 3e-3, "grad_norm": 0.4,
                     "skipped_steps": 0, "windows_per_s": 80.0, "node_steps_per_s": 1.2e6,
                     "windows_per_s_per_device": 10.0, "tflops_per_s": 120.0, "mfu": 0.12,
                     "step_time_s": 0.1, "data_share": 0.05, "mem_peak_gib": 20.0,
                     "mem_reserved_peak_gib": 24.0, "mem_peak_pct": 25.0, "alloc_retries": 0, "ooms": 0,
                     "rss_gib": 3.0, "rss_peak_gib": 3.5})
        if step % 50 == 0:
            recs.append({"kind": "eval", "step": step, "val/loss": 1.0 / step, "val/r2_fmri": step / 200,
                         "val/skill_fmri": step / 400})
        if step == 60:  # job died after step 60 and resumed from the step-50 checkpoint
            recs.append({"kind": "env", "step": 50, "run_id": "abcd1234", "device_name": "NVIDIA H100 80GB HBM3"})
            recs.append({"kind": "train", "step": 60, "loss": 9.0, "windows_per_s": 70.0, "node_steps_per_s": 1e6})
    write_jsonl(run / "metrics.jsonl", recs, torn_tail=True)
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(json.dumps({
        "horizons": [1, 2, 3, 4],
        "fmri": {"model": {"r2": [0.6, 0.5, 0.4, 0.3]}, "persistence": {"r2": [0.5, 0.3, 0.2, 0.1]},
                 "skill_vs_persistence": [0.2, 0.29, 0.25, 0.22], "crps": 0.31},
        "subjects": ["sub-07", "sub-08"]}))


def test_report_renders_pngs_and_summary(tmp_path):
    run = tmp_path / "run"
    synthetic(run)
    train, evals, env = load_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in train] == list(range(10, 110, 10))  # resume dedup + torn line skipped
    assert train[5]["loss"] == 9.0                                # the recomputed step-60 record wins
    assert [r["step"] for r in evals] == [50, 100] and env["run_id"] == "abcd1234"

    summary = render_report(run)
    assert summary == run / "report" / "summary.md"
    pngs = {p.name for p in (run / "report").glob("*.png")}
    assert {"loss.png", "optim.png", "validation.png", "throughput.png", "memory.png", "eval_report.png",
            "other.png"} <= pngs
    for name in pngs:
        assert (run / "report" / name).read_bytes()[:8] == PNG_MAGIC
    md = summary.read_text()
    for name in pngs:
        assert f"]({name})" in md
    assert "| windows_per_s | 80 |" in md and "| mfu | 0.12 |" in md
    assert "val/skill_fmri" in md and "0.25 @ 100 (max)" in md and "(min)" in md
    assert "fmri.skill_vs_persistence" in md and "NVIDIA H100 80GB HBM3 x 8 (fsdp2)" in md


def test_report_tolerates_minimal_and_missing_metrics(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    md = render_report(bare).read_text()
    assert "No training records" in md and not list((bare / "report").glob("*.png"))

    minimal = tmp_path / "minimal"
    minimal.mkdir()
    write_jsonl(minimal / "metrics.jsonl", [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)])
    (minimal / "eval").mkdir()
    (minimal / "eval" / "report.json").write_text("{not json")
    md = render_report(minimal).read_text()
    assert {p.name for p in (minimal / "report").glob("*.png")} == {"loss.png"}
    assert "could not read" in md


def test_report_on_a_real_telemetry_run(tmp_path):
    run = tmp_path / "run"
    cfg = LoggingConfig(log_every=2, wandb="disabled", progress="off")
    tel = Telemetry(cfg, run, is_main=True, world_size=1, device=torch.device("cpu"), config_dict={},
                    run_name="r", resume_run_id=None, max_steps=6)
    for step in range(1, 7):
        tel.step_begin()
        tel.data_loaded()
        tel.step_end(step, n_windows=4, n_node_steps=4000)
        if tel.should_flush(step):
            tel.log(step, {"loss": 1.0 / step, "loss/recon_fmri": 0.5 / step, "lr/base": 1e-3})
            tel.flush(step)
    tel.log_eval(6, {"loss": 0.4, "skill_fmri": 0.1})
    tel.close(print_summary=False)
    summary = render_report(run)
    pngs = {p.name for p in (run / "report").glob("*.png")}
    assert {"loss.png", "throughput.png", "memory.png", "validation.png"} <= pngs
    assert "rss_gib" in summary.read_text()
