"""Standard exports of node-wise results: MNI coordinates (mm), atlas reference, orientation, NIfTI maps.

Every node-wise file a twin writes (EC, responses, attributions) carries, beside its numbers, a
``nodes`` table: index (row/column order), name, ``x, y, z`` in millimetres in the space named by
``space`` with the axes of ``orientation``, and whether the slot has data. The positions are taken as
the data layer stores them (``Recording.region_pos`` / ``channel_pos``) in :data:`POSITION_UNIT` and
converted to mm here, in one place; a checkpoint whose metadata names ``position_unit`` overrides it.

    doc = node_table(names, positions, atlas="/data/atlas.nii.gz")     # -> {"space", "unit": "mm", "nodes": [...]}
    write_node_map(values, atlas_img, "ec_outstrength.nii.gz")           # one value per parcel label
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from twinbrain.data.types import POSITION_UNIT

MM_PER = {"m": 1000.0, "mm": 1.0}
SPACE = "MNI152"           # template space of the positions (simulated cohorts: an MNI-like frame)
ORIENTATION = "RAS+"       # +x = right, +y = anterior, +z = superior (the MNI / nilearn convention)


def positions_mm(positions, unit: str = POSITION_UNIT) -> np.ndarray:
    """``[N, 3]`` positions in ``unit`` -> ``[N, 3]`` float64 millimetres (NaN rows stay NaN)."""
    if unit not in MM_PER:
        raise ValueError(f"position unit '{unit}' is not one of {sorted(MM_PER)}")
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"positions must be [N, 3] (x, y, z), got {pos.shape}")
    return pos * MM_PER[unit]


def node_table(names: list[str], positions=None, *, unit: str = POSITION_UNIT, atlas: str = "",
               atlas_labels: str = "", mask=None, space: str = SPACE) -> dict:
    """The node block of an export: ``{"space", "orientation", "unit": "mm", "atlas", "atlas_labels",
    "nodes": [{"index", "name", "x", "y", "z", "present"}]}``. Unknown positions (all-zero rows, or no
    positions at all) are written as null coordinates rather than a fake origin."""
    n = len(names)
    pos = np.full((n, 3), np.nan) if positions is None or len(positions) == 0 else positions_mm(positions, unit)
    if pos.shape[0] != n:
        raise ValueError(f"{n} node names but {pos.shape[0]} positions")
    unknown = ~np.isfinite(pos).all(1) | (np.abs(pos).sum(1) == 0)
    present = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    nodes = [{"index": i, "name": str(names[i]),
              **({"x": None, "y": None, "z": None} if unknown[i] else
                 {"x": round(float(pos[i, 0]), 3), "y": round(float(pos[i, 1]), 3), "z": round(float(pos[i, 2]), 3)}),
              "present": bool(present[i])} for i in range(n)]
    return {"space": space, "orientation": ORIENTATION, "unit": "mm", "atlas": str(atlas),
            "atlas_labels": str(atlas_labels), "nodes": nodes}


def coords_mm(table: dict) -> np.ndarray:
    """``[N, 3]`` mm coordinates of a :func:`node_table` (NaN where unknown)."""
    return np.array([[np.nan if nd[k] is None else nd[k] for k in "xyz"] for nd in table["nodes"]], np.float64)


def write_node_map(values, atlas_img, path, label_values=None) -> Path:
    """A NIfTI map with ``values[i]`` in every voxel of parcel ``label_values[i]`` (default ``i + 1``), 0
    elsewhere, on the atlas grid (same affine). ``atlas_img``: a path or a nibabel image of integer labels."""
    import nibabel as nib

    img = nib.load(str(atlas_img)) if isinstance(atlas_img, (str, Path)) else atlas_img
    labels = np.asarray(img.dataobj).astype(np.int64)
    values = np.asarray(values, np.float32)
    label_values = np.arange(1, len(values) + 1) if label_values is None else np.asarray(label_values, np.int64)
    if len(label_values) != len(values):
        raise ValueError(f"{len(values)} values for {len(label_values)} atlas labels")
    lut = np.zeros(max(int(labels.max()), int(label_values.max())) + 1, np.float32)
    lut[label_values] = values
    out = lut[np.clip(labels, 0, None)] * (labels > 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(out.astype(np.float32), img.affine), str(path))
    return path


def twin_node_table(twin, modality: str = "fmri") -> dict:
    """:func:`node_table` of a :class:`~twinbrain.twin.twin.Twin`'s nodes: names from the checkpoint,
    positions from its data (first recording; node identity is fixed across recordings), atlas files
    from ``data.atlas`` / ``data.atlas_labels`` (empty for simulated or pre-parcellated input)."""
    names = twin.node_names(modality)
    rec = twin.data.cohort.recordings[0]
    pos = rec.region_pos if modality == "fmri" else rec.channel_pos
    mask = np.asarray(rec.region_mask, bool) if modality == "fmri" else None
    d = twin.cfg.data
    atlas = d.atlas if modality == "fmri" else ""
    space = SPACE if modality == "fmri" else f"{SPACE} (electrode positions)"
    return node_table(names, pos, unit=twin.meta.get("position_unit", POSITION_UNIT), atlas=atlas,
                      atlas_labels=d.atlas_labels if modality == "fmri" else "", mask=mask, space=space)


def write_ec_maps(twin, ec, folder) -> list[Path]:
    """NIfTI maps of EC in-strength (row sums: how strongly each region is driven) and out-strength
    (column sums: how strongly it drives), off-diagonal, when the run parcellated with an atlas
    (``data.atlas``); [] otherwise."""
    d = twin.cfg.data
    if not d.atlas or not Path(d.atlas).is_file() or not d.atlas_labels:
        return []
    from twinbrain.data.fmri import load_atlas

    atlas = load_atlas(d.atlas, d.atlas_labels)
    off = np.asarray(ec, np.float64) * (1 - np.eye(len(ec)))
    folder = Path(folder)
    return [write_node_map(off.sum(1), d.atlas, folder / "ec_in_strength.nii.gz", atlas.index),
            write_node_map(off.sum(0), d.atlas, folder / "ec_out_strength.nii.gz", atlas.index)]
