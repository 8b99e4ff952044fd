"""Strict loading of an exported TwinBrain model (``RUN/best/model.pt``, ``RUN/final/model.pt``).

The export is one ``torch.save`` dict written by the trainer (or by :meth:`Twin.save`)::

    {"model":   state_dict of TwinBrain (fp32, consolidated from DDP/FSDP2/ZeRO, no wrapper prefixes),
     "config":  Config.to_dict(),
     "data":    DataModule.metadata() (subject_map, session_map, n_fmri_slots, n_eeg_slots,
                samples_per_tr, tr, region_names, channel_names, norm_stats, split, recordings),
     "step", "metrics", "backend"}

The model is rebuilt from the checkpoint's OWN config and maps (never from defaults) and the weights are
loaded with ``strict=True``: a missing, unexpected or mis-shaped tensor is an error that names the file
and the keys. This module knows nothing of the trainer (it never imports ``twinbrain.train``).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twinbrain.config import Config, ConfigError, config_from_dict
from twinbrain.model import build_model
from twinbrain.rundir import BEST, EXPORT_FILE, RunDir
from twinbrain.weights import write_export

REQUIRED_KEYS = ("model", "config", "data")
REQUIRED_META = ("subject_map", "session_map", "n_fmri_slots", "n_eeg_slots", "samples_per_tr", "tr",
                 "region_names", "channel_names")


class CheckpointError(RuntimeError):
    """An export cannot be loaded as it is; the message names the file, the keys and the fix."""


@dataclass
class LoadedModel:
    """A model ready for inference: ``model`` in eval mode on ``device``, its ``config`` and ``metadata``."""
    model: nn.Module
    config: Config
    metadata: dict[str, Any]
    path: Path
    step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    backend: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_export_path(path: str | Path) -> Path:
    """A file, a folder holding ``model.pt`` (``RUN/best``) or a run folder (-> ``RUN/best/model.pt``)."""
    p = Path(path)
    for cand in (p, p / EXPORT_FILE, RunDir(p).model(BEST)):
        if cand.is_file():
            return cand
    raise CheckpointError(f"{p}: no exported model found (looked for {p}, {p / EXPORT_FILE} and "
                          f"{RunDir(p).model('best')}); pass RUN/best/model.pt of a finished training run")


def default_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _list(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys [{_list(missing)}]")
        if unexpected:
            parts.append(f"unexpected keys [{_list(unexpected)}]")
        if shapes:
            parts.append(f"shape mismatches [{'; '.join(shapes[:5])}]")
        raise CheckpointError(
            f"{source}: weights do not match the model rebuilt from the checkpoint's own config: "
            f"{'; '.join(parts)}. The file is corrupted or was written by a different TwinBrain version; "
            f"re-export it from the run (RUN/best/model.pt) — weights are never dropped silently")


def load_export(path: str | Path, device: str | torch.device | None = None) -> LoadedModel:
    """Load an exported model strictly. ``device``: None = CUDA if available, else CPU.

    Returns :class:`LoadedModel` with the model in eval mode (dropout off), the ``Config`` rebuilt with
    :func:`twinbrain.config.config_from_dict` (unknown keys are errors) and the data metadata.
    """
    path = resolve_export_path(path)
    try:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Metadata holding e.g. numpy scalars is refused by the safe unpickler; the export is the
            # user's own file, so read it fully (tensors and plain Python objects only are expected).
            payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unreadable / truncated / not a torch file
        raise CheckpointError(f"{path}: cannot read the export ({type(exc).__name__}: {exc}); "
                              f"the file is truncated or not a TwinBrain export") from exc
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED_KEYS):
        have = list(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a TwinBrain export; needs keys {list(REQUIRED_KEYS)}, has {have}. "
                              f"Training checkpoints (checkpoints/step-*/) are not exports: use RUN/best/model.pt")
    try:
        cfg = config_from_dict(payload["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: the saved config does not validate: {exc}") from exc
    meta = payload["data"]
    absent = [k for k in REQUIRED_META if k not in meta]
    if absent:
        raise CheckpointError(f"{path}: data metadata lacks {absent}; re-export the model from its run")
    model = build_model(cfg, n_subjects=len(meta["subject_map"]), n_sessions=len(meta["session_map"]),
                        n_fmri_slots=int(meta["n_fmri_slots"]), n_eeg_slots=int(meta["n_eeg_slots"]),
                        samples_per_tr=int(meta["samples_per_tr"]))
    state = payload["model"]
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)
    model.to(default_device(device)).eval()
    return LoadedModel(model=model, config=cfg, metadata=meta, path=path, step=int(payload.get("step", 0)),
                       metrics=dict(payload.get("metrics") or {}), backend=str(payload.get("backend", "")))


def save_export(path: str | Path, model: nn.Module, config: Config, metadata: dict, *, step: int = 0,
                metrics: dict | None = None, backend: str = "twin") -> Path:
    """Write ``model`` in the export format above (fp32 CPU weights), atomically, with ``model.safetensors``
    and ``config.json`` beside it (:mod:`twinbrain.weights`)."""
    weights = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
               for k, v in model.state_dict().items()}
    return write_export(path, weights, {"config": config.to_dict(), "data": metadata, "step": int(step),
                                        "metrics": metrics or {}, "backend": backend})
