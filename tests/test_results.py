"""Results that reach people: the offline wandb run read back (images, tables, artifact, summaries), the
safetensors export round-trip, node tables with MNI-mm coordinates in ec.json, NIfTI node maps.

One smoke run is trained in-process (10 steps, wandb offline) and evaluated once on 2 windows."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from twinbrain.config import load_config
from twinbrain.twin.exports import POSITION_UNIT, coords_mm, node_table, positions_mm, write_node_map
from twinbrain.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--train.max_steps", "10", "--train.eval_every", "10", "--train.checkpoint_every", "10"]


def inspect_runs(run_dir: Path) -> list[dict]:
    """``wandb leet inspect --summary --json`` plus the artifact records of every offline run."""
    wandb_bin = Path(sys.executable).with_name("wandb")
    out = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        summ = subprocess.run([str(wandb_bin), "leet", "inspect", "--summary", "--json", str(d)],
                              capture_output=True, text=True, timeout=120, check=True)
        recs = subprocess.run([str(wandb_bin), "leet", "inspect", "--json", str(d)],
                              capture_output=True, text=True, timeout=120, check=True)
        arts = [r["artifact"] for r in map(json.loads, filter(str.strip, recs.stdout.splitlines()))
                if r.get("type") == "artifact"]
        out.append({**json.loads(summ.stdout), "artifacts": arts})
    return out


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("results_run")
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(out / "wb-config"),
                 "NETRC": str(out / "no-netrc")}.items():
        mp.setenv(k, v)
    mp.delenv("WANDB_API_KEY", raising=False)
    from twinbrain.eval.evaluate import evaluate_checkpoint
    from twinbrain.train.trainer import Trainer
    cfg = load_config(ROOT / "configs/smoke.yaml", ["--run.out", str(out), "--logging.wandb", "offline",
                                                     "--logging.progress", "off", "--logging.flops", "false", *STEPS])
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    report = evaluate_checkpoint(out / "best" / "model.pt", split="test", overrides=["--eval.max_windows", "2"],
                                 device="cpu", mlp=False, validity=False, wandb="offline")
    yield out, report
    mp.undo()
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


def test_wandb_run_holds_figures_tables_artifact_and_summaries(evaluated):
    out, report = evaluated
    runs = inspect_runs(out)
    assert len(runs) == 2 and len({r["run_id"] for r in runs}) == 1        # training, then evaluation
    train, ev = runs
    s = train["summary"]
    assert s["val/loss"]["min"] > 0 and "train/loss" in s and "perf/windows_per_s" in s
    assert not {"step", "time", "loss", "windows_per_s"} & set(s)            # grouped, no duplicates
    (art,) = [a for a in train["artifacts"] if a["type"] == "model"]
    assert "best" in art["aliases"] and art["metadata"]
    assert {e["path"] for e in art["manifest"]["contents"]} == {"model.safetensors", "config.json", "model.pt"}
    assert {a["type"] for a in ev["artifacts"]} == {"run_table"}           # the tables are stored
    e = ev["summary"]
    for name in ("horizons", "forecast_fmri", "forecast_eeg"):
        assert e[f"eval/test/{name}"]["_type"] == "image-file"
    for m in ("fmri", "eeg"):
        t = e[f"eval/test/{m}_forecast_r2"]
        assert t["_type"] == "table-file" and t["ncols"] == 7
        f = report["forecast"][m]
        assert len(f["baselines"]) == 5                                       # persistence, ar1, ar, var, svar
        assert t["nrows"] == len(f["horizons"]) * (1 + len(f["baselines"]))  # model + every baseline per horizon
        assert e[f"eval/{m}/strongest_h1"] in report["forecast"][m]["baselines"]
        assert e[f"eval/{m}/r2_h1"] == pytest.approx(report["forecast"][m]["model"]["r2"][0])


def test_safetensors_export_round_trips_to_the_same_tensors(evaluated):
    out, _ = evaluated
    for folder in ("best", "final"):
        pt = torch.load(out / folder / "model.pt", map_location="cpu", weights_only=False)
        tensors, cfg = load_weights(out / folder)
        assert set(tensors) == set(pt["model"]) and len(tensors) > 10
        assert all(torch.equal(tensors[k], pt["model"][k]) for k in tensors)
        assert cfg["config"]["train"]["lr"] == pt["config"]["train"]["lr"] and cfg["step"] == pt["step"]
        assert cfg["data"]["region_names"] == pt["data"]["region_names"]
    # loadable with safetensors alone, no TwinBrain
    code = ("import sys; from safetensors.numpy import load_file; "
            "print(len(load_file(sys.argv[1])))")
    res = subprocess.run([sys.executable, "-c", code, str(out / "best" / "model.safetensors")],
                         capture_output=True, text=True, check=True, timeout=60)
    assert int(res.stdout) == len(tensors)


def test_ec_json_has_mni_mm_coordinates(evaluated):
    from twinbrain.twin.twin import Twin
    out, _ = evaluated
    twin = Twin.from_checkpoint(out / "best" / "model.pt", "cpu")
    ws = twin.windows(split="test")[:2]
    ec = twin.effective_connectivity(ws, horizon=1)
    _, side = twin.save_ec(ec, out / "ec" / "ec.npy")
    doc = json.loads(side.read_text())
    assert doc["unit"] == "mm" and doc["orientation"] == "RAS+" and doc["space"].startswith("MNI")
    nodes = doc["nodes"]
    assert [n["name"] for n in nodes] == doc["names"] and [n["index"] for n in nodes] == list(range(len(ec)))
    pos = twin.data.cohort.recordings[0].region_pos
    xyz = coords_mm(doc)
    assert np.allclose(xyz, positions_mm(pos, POSITION_UNIT), atol=1e-3)
    assert np.abs(xyz).max() > 20          # millimetres, not metres: a brain is ~140 mm wide


def test_node_table_units_and_unknown_positions():
    t = node_table(["a", "b"], np.array([[0.01, -0.02, 0.03], [0.0, 0.0, 0.0]]), unit="m")
    a, b = t["nodes"]
    assert (a["x"], a["y"], a["z"]) == (10.0, -20.0, 30.0) and b["x"] is None     # origin = unknown
    assert node_table(["a"], np.array([[10.0, 0, 0]]), unit="mm")["nodes"][0]["x"] == 10.0
    with pytest.raises(ValueError, match="unit"):
        positions_mm(np.zeros((1, 3)), "cm")


def test_node_map_fills_each_parcel(tmp_path):
    labels = np.zeros((4, 4, 4), np.int16)
    labels[:2] = 3
    labels[2:, :2] = 7
    atlas = nib.Nifti1Image(labels, np.diag([2.0, 2.0, 2.0, 1.0]))
    path = write_node_map([0.5, -1.0], atlas, tmp_path / "map.nii.gz", label_values=[3, 7])
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    assert np.allclose(img.affine, atlas.affine)
    assert (data[:2] == 0.5).all() and (data[2:, :2] == -1.0).all() and (data[2:, 2:] == 0).all()


def test_ec_glass_brain_draws_the_strongest_edges(tmp_path):
    from twinbrain.twin.plots import plot_ec_glass_brain
    rng = np.random.default_rng(0)
    pos = rng.uniform(-60, 60, (12, 3))
    pos[3] = np.nan                                              # a slot without a position is left out
    ec = rng.normal(0, 0.1, (12, 12))
    ec[5, 2] = 2.0
    path = plot_ec_glass_brain(ec, pos, tmp_path / "glass.png", top=5)
    assert path.is_file() and path.stat().st_size > 10_000
