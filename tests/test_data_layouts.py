"""Bring your own data, end to end through the CLI: ``prepare -> train -> evaluate -> twin ec | perturb |
personalize`` for fMRI-only BIDS (parcellated), EEG-only BIDS (EDF), paired BIDS and the arrays source,
plus a cohort passed in memory and found again by every verb. Datasets are built on the fly and tiny;
each layout trains once (a few steps) and all its assertions share that run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.bids_synth import make_recording as make_paired
from tests.synth_recordings import make_cohort
from twinbrain.cli import main
from twinbrain.data.arrays import write_arrays
from twinbrain.data.bids_io import write_cohort_bids
from twinbrain.data.types import Cohort

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
TINY = f"""base: {SMOKE}
data: {{window_s: 16, stride_s: 8, val_subjects: 1, test_subjects: 1}}
graph: {{k_fmri: 3, k_eeg: 2, k_cross: 1}}
model: {{eeg_patch: 10, eeg_stride: 10, hidden: 16, heads: 2}}
train: {{max_steps: 4, eval_every: 2, checkpoint_every: 2, warmup_steps: 1}}
logging: {{wandb: disabled, progress: "off", flops: false}}
"""


def fmri_only_bids(root: Path) -> list[str]:
    c = make_cohort(4, n_regions=6, n_channels=0, n_vols=80, tr=1.0, sfreq=20.0)
    for r in c.recordings:          # no session, no run: labels must not grow empty entities
        r.session, r.run = "", ""
    write_cohort_bids(c, root, fmri_format="npy")
    return ["--data.source", "bids", "--data.bids_root", str(root)]


def fmri_nifti_bids(root: Path) -> list[str]:
    """4D BOLD on a 3 mm grid; a 6-parcel atlas on a 1.5 mm grid with its own lookup table beside it (no
    data.atlas_labels): the nilearn masker resamples it onto the BOLD grid."""
    import nibabel as nib
    from twinbrain.data.bids_io import _write_json
    lab = np.zeros((6, 4, 3), np.int16)
    for k in range(6):
        lab[k] = k + 1                                              # parcel k+1 = slab x == k
    fine = np.repeat(np.repeat(np.repeat(lab, 2, 0), 2, 1), 2, 2)
    adir = root.parent / "atlas"
    adir.mkdir(parents=True)
    nib.save(nib.Nifti1Image(fine, np.diag([1.5, 1.5, 1.5, 1.0])), str(adir / "space-MNI_atlas-slabs_dseg.nii.gz"))
    (adir / "space-MNI_atlas-slabs_dseg.txt").write_text("".join(f"{k + 1} slab{k + 1} 0 0 0 0\n" for k in range(6)))
    for s in range(4):
        sig = make_cohort(1, n_regions=6, n_channels=0, n_vols=80, tr=1.0).recordings[0].fmri
        rng = np.random.default_rng(s)
        vox = sig[lab - 1] + 0.3 * rng.standard_normal(lab.shape + (80,))        # [6, 4, 3, T]
        img = nib.Nifti1Image(vox.astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_zooms((3.0, 3.0, 3.0, 1.0))
        func = root / f"sub-{s:02d}" / "func"
        func.mkdir(parents=True)
        nib.save(img, str(func / f"sub-{s:02d}_task-rest_space-MNI_bold.nii.gz"))
        _write_json(func / f"sub-{s:02d}_task-rest_space-MNI_bold.json", {"RepetitionTime": 1.0})
    return ["--data.source", "bids", "--data.bids_root", str(root),
            "--data.atlas", str(adir / "space-MNI_atlas-slabs_dseg.nii.gz")]


def eeg_only_bids(root: Path) -> list[str]:
    c = make_cohort(4, n_regions=0, n_channels=4, n_vols=80, tr=1.0, sfreq=100.0)
    for r in c.recordings:
        r.channel_names = ["Fz", "Cz", "Pz", "Oz"]
    write_cohort_bids(c, root, eeg_format="edf")
    return ["--data.source", "bids", "--data.bids_root", str(root), "--data.eeg_sfreq", "100",
            "--data.eeg_h_freq", "30"]


def paired_bids(root: Path) -> list[str]:
    recs = [make_paired(f"{s:02d}", n_vols=40, tr=2.0, sfreq=100.0, seed=s) for s in range(4)]
    write_cohort_bids(Cohort(recs), root)
    return ["--data.source", "bids", "--data.bids_root", str(root), "--data.eeg_sfreq", "100",
            "--data.eeg_h_freq", "30", "--model.eeg_patch", "20", "--model.eeg_stride", "20"]


def arrays(root: Path) -> list[str]:
    write_arrays(make_cohort(4, n_regions=6, n_channels=0, n_vols=80, tr=1.0, sfreq=20.0), root)
    return ["--data.source", "arrays", "--data.arrays_root", str(root)]


LAYOUTS = {"fmri_bids": (fmri_only_bids, ("fmri",), "fMRI-only"),
           "fmri_nifti": (fmri_nifti_bids, ("fmri",), "fMRI-only"), "eeg_bids": (eeg_only_bids, ("eeg",), "EEG-only"),
           "paired_bids": (paired_bids, ("fmri", "eeg"), "paired EEG-fMRI"), "arrays": (arrays, ("fmri",), None)}


def run_cli(capsys, *argv) -> str:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    assert rc == 0, f"twinbrain {' '.join(argv)} exited {rc}:\n{out.err[-3000:]}"
    return out.out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One trained run per layout (built on first use), shared by every assertion on that layout."""
    runs = {}

    def get(name, capsys):
        if name not in runs:
            tmp = tmp_path_factory.mktemp(name)
            make, mods, kind = LAYOUTS[name]
            (tmp / "tiny.yaml").write_text(TINY)
            args = ["--config", str(tmp / "tiny.yaml"), "--run.out", str(tmp / "run"), *make(tmp / "data")]
            prep = run_cli(capsys, "prepare", *args) if LAYOUTS[name][2] else ""
            run_cli(capsys, "train", *args)
            runs[name] = (tmp, tmp / "run" / "best" / "model.pt", mods, kind, prep)
        return runs[name]
    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_runs_every_verb_through_the_cli(trained, capsys, name):
    tmp, ckpt, mods, kind, prep = trained(name, capsys)
    if kind:
        assert f"4 {kind} runs" in prep
        assert "ses-_" not in prep and "run-\n" not in prep and not prep.count("_run-:")
    meta = torch.load(ckpt, weights_only=False)["data"]
    assert tuple(meta["modalities"]) == mods and len(meta["cohort_fingerprint"]) == 32
    for m in ("fmri", "eeg"):
        assert (meta[f"n_{m}_slots"] > 0) == (m in mods)
    if name == "fmri_nifti":                       # names from the atlas's own lookup table
        assert meta["region_names"] == [f"slab{k}" for k in range(1, 7)]

    run_cli(capsys, "evaluate", "--checkpoint", str(ckpt))
    report = json.loads((ckpt.parent.parent / "eval" / "report.json").read_text())
    assert set(report["forecast"]) == set(mods)

    mod = mods[0]
    n = meta[f"n_{mod}_slots"]
    out = run_cli(capsys, "twin", "ec", "--checkpoint", str(ckpt), "--max-windows", "3")
    ec = np.load(ckpt.parent.parent / "twin" / "ec" / "ec.npy")
    assert ec.shape == (n, n) and np.isfinite(ec).all() and "from 3 windows" in out

    run_cli(capsys, "twin", "perturb", "--checkpoint", str(ckpt), "--targets", "0")
    delta = np.load(ckpt.parent.parent / "twin" / "perturb" / f"delta_{mod}.npy")
    assert delta.shape[0] == n and np.abs(delta[0]).max() > 0

    test_subject = meta["split"]["subjects"]["test"][0]
    out = run_cli(capsys, "twin", "personalize", "--checkpoint", str(ckpt), "--subject", test_subject,
                  "--steps", "3")
    rep = json.loads((ckpt.parent.parent / "twin" / "personalize" / "personalize.json").read_text())
    assert rep["kind"] == "held-out" and rep["subject_index"] == meta["subject_map"][test_subject]
    assert "held-out scores before -> after" in out


def test_ec_in_chunks_equals_one_pass(trained, capsys):
    """The progress-bar EC (chunks weighted by their window counts) is the same matrix as one call."""
    from twinbrain.twin import Twin
    from twinbrain.twin.cli import ec_in_chunks
    _, ckpt, _, _, _ = trained("arrays", capsys)
    twin = Twin.from_checkpoint(ckpt, device="cpu")
    ws = twin.windows(split="test", limit=5)
    assert len(ws) == 5 and len(twin.windows(split="test", ids=[4, 1])) == 2
    whole = twin.effective_connectivity(list(ws))
    np.testing.assert_allclose(ec_in_chunks(twin, ws, modality="fmri", amplitude=1.0, signed=True, horizon=1,
                                            progress=False, chunk=2), whole, rtol=1e-6, atol=1e-9)


def test_moved_or_changed_data_is_found_or_refused(trained, capsys, tmp_path):
    """--data.* points every verb at moved data; data that changed fail the fingerprint check."""
    import shutil
    tmp, ckpt, _, _, _ = trained("arrays", capsys)
    moved = tmp_path / "moved"
    shutil.copytree(tmp / "data", moved)
    run_cli(capsys, "twin", "ec", "--checkpoint", str(ckpt), "--max-windows", "1", "--data.arrays_root", str(moved))
    run_cli(capsys, "evaluate", "--checkpoint", str(ckpt), "--data.arrays_root", str(moved))
    first = sorted(moved.glob("*_bold.npy"))[0]
    x = np.load(first)
    np.save(first, x + np.random.default_rng(0).standard_normal(x.shape).astype(np.float32))
    assert main(["twin", "ec", "--checkpoint", str(ckpt), "--data.arrays_root", str(moved)]) != 0
    assert "fingerprint" in capsys.readouterr().err
    assert main(["twin", "ec", "--checkpoint", str(ckpt), "--data.window_s", "8"]) != 0
    assert "only the location" in capsys.readouterr().err


def test_in_memory_cohort_is_recorded_for_every_verb(tmp_path, capsys):
    """A cohort given to the Python API is recorded in the run, so the CLI verbs need no Python."""
    from tests.test_trainer import synth_cfg
    from twinbrain.data.module import DataModule
    from twinbrain.train.trainer import Trainer
    cfg = synth_cfg(tmp_path / "run", "--train.max_steps", "2", "--train.eval_every", "2",
                    "--train.checkpoint_every", "2", "--train.warmup_steps", "1")
    tr = Trainer(cfg, data=DataModule(cfg, cohort=make_cohort(4, n_regions=6, n_channels=4, n_vols=60, tr=1.0,
                                                              sfreq=20.0)).setup())
    tr.train()
    tr.close()
    ckpt = tmp_path / "run" / "best" / "model.pt"
    meta = torch.load(ckpt, weights_only=False)["data"]
    assert Path(meta["cohort_record"]) == (tmp_path / "run" / "cohort").resolve()
    run_cli(capsys, "evaluate", "--checkpoint", str(ckpt))     # saved config says 'simulated': the record wins
    run_cli(capsys, "twin", "ec", "--checkpoint", str(ckpt), "--max-windows", "2")
    run_cli(capsys, "twin", "perturb", "--checkpoint", str(ckpt), "--targets", "E1", "--modality", "eeg")


def test_personalize_new_subject_and_refuse_a_training_subject(trained, capsys):
    from twinbrain.data.clock import apply_clock
    from twinbrain.twin import Twin
    _, ckpt, _, _, _ = trained("arrays", capsys)
    twin = Twin.from_checkpoint(ckpt, device="cpu")
    train_subject = twin.meta["split"]["subjects"]["train"][0]
    with pytest.raises(ValueError, match="was a training subject"):
        twin.personalize(twin.data.cohort, subject=train_subject, steps=1)
    other = make_cohort(5, n_regions=6, n_channels=0, n_vols=80, tr=1.0, sfreq=20.0)
    other.recordings = [r for r in other.recordings if r.subject == "04"]
    new, report = twin.personalize(apply_clock(other, twin.cfg), steps=2)
    assert report["kind"] == "new" and new.meta["subject_map"]["04"] == len(twin.meta["subject_map"])
