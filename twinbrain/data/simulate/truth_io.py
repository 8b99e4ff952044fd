"""Save / load a GroundTruth as ``<stem>.npz`` (arrays) + ``<stem>.json`` (scalars, meta).

Arrays keep their dtype and values exactly; per-subject dictionaries are stored
as ``<field>__<subject>`` arrays with the subject order in the JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..types import GroundTruth

FORMAT = "twinbrain.ground_truth/1"
_ARRAYS = ("coupling", "perturb_regions", "modules", "gain")
_PER_SUBJECT = ("subject_coupling", "perturb_bold", "perturb_eeg")


def _stem(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".npz", ".json") else path


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"ground-truth meta value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


def save_truth(truth: GroundTruth, path: str | Path) -> tuple[Path, Path]:
    """Write ``truth`` next to ``path`` (suffix ignored); returns the (npz, json) paths. Atomic per file."""
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    subjects = list(truth.subject_coupling)
    for name in _PER_SUBJECT[1:]:
        if list(getattr(truth, name)) != subjects:
            raise ValueError(f"{stem}: {name} has subjects {list(getattr(truth, name))}, "
                             f"subject_coupling has {subjects}; they must match")
    arrays = {name: np.asarray(getattr(truth, name)) for name in _ARRAYS}
    for name in _PER_SUBJECT:
        for sid, arr in getattr(truth, name).items():
            arrays[f"{name}__{sid}"] = np.asarray(arr)
    header = {"format": FORMAT, "subjects": subjects, "perturb_onset_s": truth.perturb_onset_s,
              "meta": truth.meta}
    npz, js = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")
    tmp = npz.with_name(npz.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, npz)
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps(header, indent=1, default=_json_default))
    os.replace(tmp, js)
    return npz, js


def load_truth(path: str | Path) -> GroundTruth:
    """Read what ``save_truth`` wrote (``path`` with or without the .npz/.json suffix)."""
    stem = _stem(path)
    npz, js = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")
    for f in (npz, js):
        if not f.is_file():
            raise FileNotFoundError(f"ground truth file {f} is missing; write it with save_truth")
    header = json.loads(js.read_text())
    if header.get("format") != FORMAT:
        raise ValueError(f"{js}: format {header.get('format')!r}, expected {FORMAT!r}")
    subjects = header["subjects"]
    with np.load(npz, allow_pickle=False) as data:
        per = {name: {sid: data[f"{name}__{sid}"] for sid in subjects} for name in _PER_SUBJECT}
        return GroundTruth(coupling=data["coupling"], perturb_regions=data["perturb_regions"],
                           modules=data["modules"], gain=data["gain"],
                           perturb_onset_s=header["perturb_onset_s"], meta=header["meta"], **per)
