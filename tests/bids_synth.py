"""Small synthetic EEG-fMRI datasets for the BIDS / store tests (written with MNE and nibabel)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from twinbrain.data.types import Recording

CHANNELS = ["Fz", "Cz", "Pz", "Oz", "C3", "C4"]


def make_recording(subject="01", session="1", task="rest", run="1", n_channels=4, n_regions=5,
                   n_vols=30, tr=2.0, sfreq=250.0, lead_s=3.0, tail_s=2.0, seed=0) -> Recording:
    """EEG starting ``lead_s`` before fMRI volume 0 (eeg_onset_s = -lead_s) and ending ``tail_s`` after."""
    rng = np.random.default_rng(seed)
    n_samp = int(round((n_vols * tr + lead_s + tail_s) * sfreq))
    eeg = rng.standard_normal((n_channels, n_samp)) * 1e-5
    fmri = rng.standard_normal((n_regions, n_vols)).astype(np.float32)
    pos = np.column_stack([np.linspace(-50, 50, n_channels), np.linspace(50, -50, n_channels),
                           np.full(n_channels, 80.0)])                           # mm
    return Recording(subject=subject, session=session, task=task, run=run, eeg=eeg, eeg_sfreq=sfreq,
                     fmri=fmri, tr=tr, channel_names=CHANNELS[:n_channels],
                     region_names=[f"roi{i}" for i in range(n_regions)], channel_pos=pos,
                     region_pos=rng.uniform(-60, 60, (n_regions, 3)),
                     region_mask=np.ones(n_regions, bool), eeg_onset_s=-lead_s,
                     modules=np.arange(n_regions) % 2)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_dataset(root: Path, recs: list[Recording], **kw) -> Path:
    from twinbrain.data.bids_io import write_cohort_bids
    from twinbrain.data.types import Cohort
    return write_cohort_bids(Cohort(recs), root, **kw)


def make_config(root: Path, store: Path, **data):
    from twinbrain.config import load_config
    return load_config(overrides={"data": {"source": "bids", "bids_root": str(root),
                                           "store_dir": str(store), **data},
                                  "logging": {"progress": "off"}})


def tiny_atlas(folder: Path, space: str = "MNI", affine=None, extra_label: int | None = None):
    """4x4x3 label image: 1 (x<2), 2 (x>=2, y<2), 4 (x>=2, y>=2); table 1..4 (3 has no voxels)."""
    import nibabel as nib
    folder.mkdir(parents=True, exist_ok=True)
    lab = np.zeros((4, 4, 3), np.int16)
    lab[:2] = 1
    lab[2:, :2] = 2
    lab[2:, 2:] = 4
    if extra_label is not None:
        lab[0, 0, 0] = extra_label
    affine = np.diag([3.0, 3.0, 3.0, 1.0]) if affine is None else affine
    path = folder / f"space-{space}_atlas-tiny_dseg.nii.gz"
    nib.save(nib.Nifti1Image(lab, affine), str(path))
    table = folder / "atlas-tiny_dseg.tsv"
    table.write_text("index\tname\tmodule\n1\tleft\tvis\n2\tright\tdmn\n3\tghost\tdmn\n4\toutside\tvis\n")
    return path, table, lab, affine


def write_bold(path: Path, lab: np.ndarray, affine, n_vols: int, tr: float, seed=0, header_tr=None):
    """4D BOLD on the atlas grid: region-specific signal + voxel noise; label-4 voxels all zero."""
    import nibabel as nib
    rng = np.random.default_rng(seed)
    data = 100 + rng.standard_normal(lab.shape + (n_vols,))
    data[lab == 4] = 0.0
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    zooms = list(img.header.get_zooms()[:3]) + [tr if header_tr is None else header_tr]
    img.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return data
