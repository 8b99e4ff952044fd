"""fMRI parcellation (nilearn maskers) and cleaning.

Two inputs: a 4D NIfTI BOLD image plus an atlas (3D label image or 4D probabilistic maps, resampled to
the BOLD grid; label table: TSV with ``index`` and ``name``, optional ``x y z`` in mm and ``module``, or the
atlas's own ``INDEX NAME`` lookup table found beside it), or an already parcellated run: ``*_bold.npy``
``[regions x volumes]`` or ``*_bold.tsv`` with a region table (``*_regions.tsv``: ``name``, optional
``index``, ``x y z`` mm, ``module``, ``mask``). A TSV's orientation is read from its labels, never from
its shape: a header of region names means one column per region (the BIDS-derivative convention); a
first column headed ``region`` or ``name`` means one row per region.

Node identity is fixed: every run gets every atlas slot in table order; parcels without voxels (or
without signal inside the brain mask) are all-zero rows with ``mask`` False. Cleaning is a linear
detrend plus regression of fMRIPrep confounds (when a confounds file exists) and a per-region z-score.
No temporal filtering is applied: a zero-phase filter over the whole run would leak future samples
into every window.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from twinbrain.data.bids import parse_bids_name, read_tsv

# 6 rigid-body motion parameters, their temporal derivatives, and mean CSF / white-matter signals:
# the usual fMRIPrep "14-parameter" nuisance set (absent columns are skipped and recorded).
DEFAULT_CONFOUNDS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z",
                     "trans_x_derivative1", "trans_y_derivative1", "trans_z_derivative1",
                     "rot_x_derivative1", "rot_y_derivative1", "rot_z_derivative1", "csf", "white_matter")
_TIME_UNITS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6, "unknown": 1.0}


@dataclass
class Atlas:
    """labels: ``[X, Y, Z]`` int label image (``kind == 'labels'``) or ``[X, Y, Z, K]`` float maps
    (``kind == 'maps'``, probabilistic: one map per slot, in table order); index/names/pos/modules: one
    entry per slot ``[R]`` (table order; for maps ``index`` is 1..K); pos in MNI mm; affine ``[4, 4]``
    voxel -> mm."""
    path: Path
    table: Path | None
    labels: np.ndarray
    affine: np.ndarray
    index: np.ndarray
    names: list[str]
    pos: np.ndarray
    modules: np.ndarray | None
    space: str = ""
    kind: str = "labels"


@dataclass
class FMRIRun:
    """data: ``[R, T]`` float32 cleaned and z-scored (masked rows 0); pos ``[R, 3]`` MNI mm; mask ``[R]`` bool."""
    data: np.ndarray
    tr: float
    names: list[str]
    pos: np.ndarray
    mask: np.ndarray
    modules: np.ndarray | None
    meta: dict = field(default_factory=dict)


def _float(row: dict, key: str) -> float:
    try:
        return float(row.get(key, "nan"))
    except ValueError:
        return float("nan")


def _modules(values: list[str]) -> np.ndarray | None:
    """Module labels as ints; text labels are numbered in order of first appearance."""
    if not values or any(v in ("", "n/a") for v in values):
        return None
    try:
        return np.array([int(v) for v in values], dtype=np.int64)
    except ValueError:
        order = {v: i for i, v in enumerate(dict.fromkeys(values))}
        return np.array([order[v] for v in values], dtype=np.int64)


def read_region_table(path: Path) -> tuple[list[str], np.ndarray, np.ndarray | None, np.ndarray | None, list[int]]:
    """Region table -> (names ``[R]``, pos ``[R, 3]`` MNI mm (NaN unknown), modules, mask, index)."""
    rows = read_tsv(path)
    if not rows or "name" not in rows[0]:
        raise ValueError(f"{path}: a region/label table needs a header with a 'name' column (and 'index' "
                         f"for atlases), one row per region")
    names = [r["name"] for r in rows]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path}: duplicate region names {dup[:5]}; names must be unique")
    pos = np.array([[_float(r, "x"), _float(r, "y"), _float(r, "z")] for r in rows])  # MNI mm, as stored
    mod_key = "module" if "module" in rows[0] else "network" if "network" in rows[0] else None
    modules = _modules([r[mod_key] for r in rows]) if mod_key else None
    mask = np.array([r["mask"].strip().lower() in ("1", "true") for r in rows]) if "mask" in rows[0] else None
    try:
        index = [int(r["index"]) for r in rows] if "index" in rows[0] else list(range(1, len(rows) + 1))
    except ValueError as exc:
        raise ValueError(f"{path}: 'index' must hold integer label values ({exc})") from exc
    return names, pos, modules, mask, index


def _load_nifti(path: Path):
    import nibabel as nib
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for damaged files
        raise ValueError(f"{path}: could not read NIfTI ({type(exc).__name__}: {exc}); the file is truncated "
                         f"or corrupt - re-export or re-download it") from exc
    return img, data


def find_label_table(path: Path) -> Path | None:
    """The label table shipped with an atlas image: ``<stem>.tsv|.txt|.csv`` beside it, else a BIDS
    ``*_dseg.tsv`` / ``*_probseg.tsv`` in the same folder whose entities are a subset of the image's."""
    name = path.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem
    for ext in (".tsv", ".txt", ".csv", "_labels.tsv", "_order.txt", "_LUT.txt"):
        cand = path.with_name(stem + ext)
        if cand.is_file():
            return cand
    me = parse_bids_name(path)
    if me is not None:
        best, best_n = None, -1
        for cand in sorted(path.parent.glob(f"*_{me.suffix}.tsv")):
            f = parse_bids_name(cand)
            if f is not None and set(f.entities) <= set(me.entities) and len(f.entities) > best_n:
                best, best_n = cand, len(f.entities)
        return best
    return None


def read_label_table(path: Path) -> tuple[list[str], np.ndarray, np.ndarray | None, list[int]]:
    """An atlas label table -> (names, pos ``[R, 3]`` mm (NaN unknown), modules, index).

    Either a TSV with a header (``index``, ``name``, optional ``x y z`` mm, ``module``), or a plain
    lookup table without header, one ``INDEX NAME [...]`` line per label (FreeSurfer LUT style, as the
    Schaefer ``*_order.txt`` / ``*_LUT.txt`` files ship); ``#`` lines are comments."""
    try:
        first = next((ln for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")), "")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable label table ({exc})") from exc
    if "name" in re.split(r"[\t,]", first.strip().lower()):
        names, pos, modules, _, index = read_region_table(path)
        return names, pos, modules, index
    names, index = [], []
    for ln in Path(path).read_text().splitlines():
        parts = ln.split()
        if not parts or ln.startswith("#"):
            continue
        if len(parts) < 2 or not parts[0].isdigit():
            raise ValueError(f"{path}: line {ln!r} is not 'INDEX NAME ...'; give a TSV with index and name "
                             f"columns or a lookup table with one 'INDEX NAME' line per label")
        if int(parts[0]) == 0:
            continue                                 # background
        index.append(int(parts[0]))
        names.append(parts[1])
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate label names")
    return names, np.full((len(names), 3), np.nan), None, index


def load_atlas(path: str | Path, table: str | Path = "") -> Atlas:
    """Atlas image + label table. A 3D integer image is a label atlas (every non-zero label must be in the
    table); a 4D image with several volumes is a probabilistic atlas (one map per table row, in order).
    ``table`` empty: the atlas's own table (:func:`find_label_table`), else labels are named by value."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.atlas file {path} does not exist; give the atlas image (3D labels or 4D "
                                f"probabilistic maps)")
    table = Path(table) if table else find_label_table(path)
    if table is not None and not table.is_file():
        raise FileNotFoundError(f"data.atlas_labels file {table} does not exist; give the atlas's label table "
                                f"(TSV with index, name; or an 'INDEX NAME' lookup table)")
    img, lab = _load_nifti(path)
    if lab.ndim == 4 and lab.shape[3] == 1:
        lab = lab[..., 0]
    kind = "maps" if lab.ndim == 4 else "labels"
    if kind == "labels" and (lab.ndim != 3 or not np.allclose(lab, np.round(lab))):
        raise ValueError(f"{path}: an atlas must be a 3D image of integer labels or a 4D image of probabilistic "
                         f"maps, got shape {lab.shape} (non-integer 3D values)")
    values = sorted(set(np.unique(np.round(lab)).astype(np.int64).tolist()) - {0}) if kind == "labels" else \
        list(range(1, lab.shape[3] + 1))
    if table is not None:
        names, pos, modules, index = read_label_table(table)
    else:
        warnings.warn(f"{path}: no label table given or found beside it; regions are named by label value",
                      stacklevel=2)
        index = values
        names, pos, modules = [f"label_{v}" for v in values], np.full((len(values), 3), np.nan), None
    if kind == "labels":
        lab = np.round(lab).astype(np.int64)
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise ValueError(f"{path}: labels {unknown[:10]} are not in the label table {table}; add rows for them "
                             f"or use the table that belongs to this atlas")
    else:
        lab = np.asarray(lab, np.float32)
        if len(names) != lab.shape[3]:
            raise ValueError(f"{path}: {lab.shape[3]} probabilistic maps but {len(names)} rows in the label table "
                             f"{table}; one row per map, in map order")
        index = list(range(1, lab.shape[3] + 1))
    affine = img.affine
    for i, v in enumerate(index):  # centroids (MNI mm) where the table gives no coordinates
        if np.isnan(pos[i]).any():
            w = (lab == v).astype(np.float64) if kind == "labels" else np.clip(lab[..., i], 0, None)
            if w.sum() > 0:
                ijk = np.stack(np.nonzero(w), 1)
                c = (ijk * w[tuple(ijk.T)][:, None]).sum(0) / w[tuple(ijk.T)].sum()
                pos[i] = affine[:3, :3] @ c + affine[:3, 3]
    f = parse_bids_name(path)
    return Atlas(path, table, lab, affine, np.asarray(index), names, np.nan_to_num(pos), modules,
                 f.get("space") if f else "", kind)


def check_tr(img, tr: float, path: Path, sidecar: Path | None) -> None:
    """Refuse a NIfTI whose header TR disagrees with the sidecar RepetitionTime (> 1 %)."""
    if len(img.header.get_zooms()) < 4:
        return
    zoom = float(img.header.get_zooms()[3])
    unit = img.header.get_xyzt_units()[1]
    header_tr = zoom * _TIME_UNITS.get(unit, 1.0)
    if header_tr > 0 and abs(header_tr - tr) > 0.01 * tr:
        raise ValueError(f"{path}: TR mismatch - NIfTI header says {header_tr} s but {sidecar} says "
                         f"RepetitionTime {tr} s; correct the sidecar or the header (pixdim[4])")


def parcellate(path: Path, atlas: Atlas, tr: float, sidecar: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BOLD per atlas slot with nilearn's maskers: ``[R, T]`` float64 and mask ``[R]``.

    The atlas is resampled onto the BOLD grid when the grids differ (nearest neighbour for labels,
    continuous for maps). Voxels whose time series is constant (outside the brain mask, zero-filled) are
    left out through the masker's ``mask_img``; a slot with no remaining voxel is masked (all-zero row).
    Label atlases give the mean of each parcel (``NiftiLabelsMasker``, strategy 'mean'); probabilistic
    atlases the maps' least-squares time series (``NiftiMapsMasker``). The maskers' own cleaning
    (standardize, detrend, filters) is off: TwinBrain cleans afterwards without any temporal filter over
    the run, which would leak the future into every window.
    """
    import nibabel as nib
    from nilearn.image import resample_to_img
    from nilearn.maskers import NiftiLabelsMasker, NiftiMapsMasker
    f = parse_bids_name(path)
    space = f.get("space") if f else ""
    if space and atlas.space and space != atlas.space:
        raise ValueError(f"{path} is in space '{space}' but the atlas {atlas.path} is in space '{atlas.space}'; "
                         f"use BOLD in the atlas space or an atlas in space '{space}'")
    img, data = _load_nifti(path)
    if data.ndim != 4:
        raise ValueError(f"{path}: BOLD must be a 4D image (x, y, z, volumes), got shape {data.shape}")
    check_tr(img, tr, path, sidecar)
    atlas_img = nib.Nifti1Image(atlas.labels.astype(np.int32 if atlas.kind == "labels" else np.float32),
                                atlas.affine)
    same_grid = data.shape[:3] == atlas.labels.shape[:3] and np.allclose(img.affine, atlas.affine, atol=1e-3)
    ref = nib.Nifti1Image(np.zeros(data.shape[:3], np.int8), img.affine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # nilearn's notes on resampling / removed labels
        on_grid = atlas_img if same_grid else resample_to_img(
            atlas_img, ref, interpolation="nearest" if atlas.kind == "labels" else "continuous",
            force_resample=True, copy_header=True)
    grid = np.asanyarray(on_grid.dataobj)
    inside = grid > 0 if atlas.kind == "labels" else (grid > 0).any(-1)
    x = data[inside]
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: {int((~np.isfinite(x)).any(1).sum())} voxels inside the atlas have NaN/Inf "
                         f"values; fix the preprocessing (or mask them to 0) before preparing")
    live = inside & (data.std(axis=-1) > 0)
    n_slots = len(atlas.index)
    out, mask = np.zeros((n_slots, data.shape[3])), np.zeros(n_slots, bool)
    if not live.any():
        return out, mask
    kw = dict(mask_img=nib.Nifti1Image(live.astype(np.int8), img.affine), standardize=None, detrend=False,
              resampling_target=None)
    slot = {v: i for i, v in enumerate(atlas.index.tolist())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if atlas.kind == "labels":
            masker = NiftiLabelsMasker(on_grid, strategy="mean", **kw)
            ts = masker.fit_transform(img)                                   # [T, K present]
            labels = [v for k, v in sorted((k, v) for k, v in masker.region_ids_.items() if k != "background")]
        else:
            masker = NiftiMapsMasker(on_grid, **kw)
            ts = masker.fit_transform(img)                                   # [T, K maps]
            labels = list(atlas.index)
    for col, v in enumerate(labels):
        out[slot[int(v)]] = ts[:, col]
        mask[slot[int(v)]] = True
    if atlas.kind == "maps":
        mask &= out.std(axis=1) > 0                 # a map with no weight on live voxels
    return out, mask


def read_parcellated(path: Path, regions: Path | None) -> tuple[np.ndarray, list[str], np.ndarray,
                                                                  np.ndarray | None, np.ndarray]:
    """Already parcellated run -> (``[R, T]`` float64, names, pos ``[R, 3]`` MNI mm, modules, mask ``[R]``)."""
    table = read_region_table(regions) if regions is not None else None
    if path.suffix == ".npy":
        if table is None:
            raise ValueError(f"{path}: a parcellated .npy needs a region table (*_regions.tsv with a 'name' "
                             f"column, one row per array row) next to it or inherited from a parent folder")
        try:
            ts = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"{path}: could not read ({type(exc).__name__}: {exc}); the file is truncated or "
                             f"not a numeric .npy [regions x volumes] array - re-export it") from exc
        names = table[0]
        if ts.ndim != 2 or ts.shape[0] != len(names):
            raise ValueError(f"{path}: expected [regions={len(names)} (rows of {regions}), volumes], got "
                             f"shape {ts.shape}; save the array as [regions x volumes]")
    else:
        ts, names = _read_ts_tsv(path, table[0] if table else None, regions)
    if not np.issubdtype(ts.dtype, np.number):
        raise ValueError(f"{path}: values are not numeric ({ts.dtype})")
    ts = ts.astype(np.float64)
    if not np.isfinite(ts).all():
        raise ValueError(f"{path}: {int((~np.isfinite(ts)).sum())} NaN/Inf values; interpolate them or drop the "
                         f"affected volumes before preparing")
    if table is None:
        warnings.warn(f"{path}: no region table (*_regions.tsv); region positions unknown (set to 0)",
                      stacklevel=2)
        pos, modules, mask = np.zeros((len(names), 3)), None, None
    else:
        _, pos, modules, mask, _ = table
    live = ts.std(axis=1) > 0
    mask = live if mask is None else (mask & live)
    return ts, names, np.nan_to_num(pos), modules, mask


def _read_ts_tsv(path: Path, table_names: list[str] | None, regions: Path | None) -> tuple[np.ndarray, list[str]]:
    rows = read_tsv(path)
    if not rows:
        raise ValueError(f"{path}: empty or truncated time-series table; re-export it")
    header = list(rows[0].keys())
    try:
        if header[0] in ("region", "name"):          # one row per region
            names = [r[header[0]] for r in rows]
            ts = np.array([[float(r[h]) for h in header[1:]] for r in rows])
        else:                                        # one column per region, one row per volume
            names = header
            ts = np.array([[float(r[h]) for h in header] for r in rows]).T
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: non-numeric or missing value ({exc}); the table is truncated or malformed")
    if table_names is not None:
        if set(names) != set(table_names):
            extra, miss = sorted(set(names) - set(table_names)), sorted(set(table_names) - set(names))
            raise ValueError(f"{path}: region labels do not match the region table {regions} (unknown here: "
                             f"{extra[:5]}, missing here: {miss[:5]}); use the table of this parcellation")
        order = {n: i for i, n in enumerate(names)}
        ts, names = ts[[order[n] for n in table_names]], list(table_names)
    return ts, names


def load_confounds(path: Path, n_vols: int, columns: tuple[str, ...] = DEFAULT_CONFOUNDS) -> tuple[np.ndarray, list[str]]:
    """fMRIPrep confounds -> ``[T, K]`` (first-row NaNs of derivatives set to 0) and the columns used."""
    rows = read_tsv(path)
    if len(rows) != n_vols:
        raise ValueError(f"{path}: {len(rows)} confound rows for a BOLD run of {n_vols} volumes; use the "
                         f"confounds file of this run")
    used = [c for c in columns if rows and c in rows[0]]
    vals = np.array([[float(r[c]) if r[c] not in ("n/a", "") else np.nan for c in used] for r in rows])
    return np.nan_to_num(vals.reshape(n_vols, len(used))), used


def clean(ts: np.ndarray, mask: np.ndarray, confounds: np.ndarray | None = None) -> np.ndarray:
    """Regress ``[1, linear trend, confounds]`` out of ``ts`` ``[R, T]`` and z-score each live row."""
    t = ts.shape[1]
    design = [np.ones(t), np.linspace(-1, 1, t)]
    if confounds is not None and confounds.size:
        c = confounds - confounds.mean(0)
        design += list((c / np.where(c.std(0) > 0, c.std(0), 1)).T)
    design = np.stack(design, axis=1)                           # [T, P]
    beta, *_ = np.linalg.lstsq(design, ts.T, rcond=None)
    resid = ts - (design @ beta).T
    sd = resid.std(axis=1, keepdims=True)
    out = np.where(sd > 1e-12, resid / np.where(sd > 1e-12, sd, 1.0), 0.0)
    out[~mask] = 0.0
    return out


def load_fmri(path: Path, kind: str, *, tr: float, atlas: Atlas | None, sidecar: Path | None = None,
              regions: Path | None = None, confounds: Path | None = None) -> FMRIRun:
    """Parcellate (or read) and clean one fMRI run; ``tr`` comes from the sidecar (s)."""
    meta: dict = {"fmri_file": str(path)}
    if kind == "nifti":
        if atlas is None:
            raise ValueError(f"{path}: a NIfTI BOLD run needs an atlas; set data.atlas and data.atlas_labels")
        ts, mask = parcellate(path, atlas, tr, sidecar)
        names, pos, modules = list(atlas.names), atlas.pos.copy(), atlas.modules
        meta["atlas"] = str(atlas.path)
    else:
        ts, names, pos, modules, mask = read_parcellated(path, regions)
    conf = None
    if confounds is not None:
        conf, meta["confounds"] = load_confounds(confounds, ts.shape[1])
    if ts.shape[1] < 3:
        raise ValueError(f"{path}: only {ts.shape[1]} volumes; the run is truncated")
    if not mask.any():
        raise ValueError(f"{path}: no region has signal (all parcels empty or constant); check the atlas/mask")
    data = clean(ts, mask, conf).astype(np.float32)
    meta["empty_regions"] = [n for n, m in zip(names, mask) if not m]
    return FMRIRun(data, tr, names, pos.astype(np.float32), mask, modules, meta)
