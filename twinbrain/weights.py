"""The export format: ``model.pt`` and, beside it, framework-neutral ``model.safetensors`` + ``config.json``.

    write_export(RUN/best/model.pt, state_dict, {"config": cfg.to_dict(), "data": meta, "step": step, ...})
    save_weights(RUN/best, state_dict, config=cfg.to_dict(), metadata=meta, step=step)
    tensors = safetensors.torch.load_file("RUN/best/model.safetensors")     # no TwinBrain needed

``model.safetensors`` holds the same fp32 tensors as ``model.pt['model']`` under the same names;
``config.json`` holds the run config, the data facts needed to rebuild inputs (node names, slots,
sampling, normalisation) and the step. This module imports only torch and safetensors so both the
trainer's exporter and the twin (``Twin.save``) write exports through :func:`write_export`, the one writer.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):                         # numpy arrays and scalars, tensors
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def save_weights(folder: str | Path, state: dict[str, torch.Tensor], *, config: dict, metadata: dict | None = None,
                 step: int = 0, metrics: dict | None = None) -> tuple[Path, Path]:
    """Write ``folder/model.safetensors`` (tensors of ``state``, contiguous CPU copies) and
    ``folder/config.json``, each atomically. Non-tensor entries of ``state`` are skipped."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    wpath, cpath = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    tmp = wpath.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "twinbrain", "step": str(int(step))})
    tmp.replace(wpath)
    doc = {"format": "twinbrain", "format_version": FORMAT_VERSION, "weights": WEIGHTS_FILE, "step": int(step),
           "n_tensors": len(tensors), "n_parameters": int(sum(t.numel() for t in tensors.values())),
           "config": _jsonable(config), "data": _jsonable(metadata or {}), "metrics": _jsonable(metrics or {})}
    tmp = cpath.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False))
    tmp.replace(cpath)
    return wpath, cpath


def write_export(path: str | Path, weights: dict[str, torch.Tensor], payload: dict) -> Path:
    """Write the export ``path`` (``model.pt`` = ``{'model': weights, **payload}``; payload: ``config``, ``data``,
    ``step``, ``metrics``, ``backend``, ...) atomically and, beside it, the same weights as ``model.safetensors``
    with ``config.json``. ``weights``: fp32 CPU tensors. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": weights, **payload}, tmp)
    tmp.replace(path)
    save_weights(path.parent, weights, config=payload.get("config", {}), metadata=payload.get("data"),
                 step=payload.get("step", 0), metrics=payload.get("metrics"))
    return path


def load_weights(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, config.json contents)`` of an export folder (or of its ``model.safetensors`` path)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    folder = folder.parent if folder.suffix else folder
    wpath, cpath = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not wpath.is_file():
        raise FileNotFoundError(f"{wpath} does not exist; exports written before safetensors support have only "
                                f"model.pt (re-export with `Twin.from_checkpoint(...).save(...)`)")
    return load_file(str(wpath)), (json.loads(cpath.read_text()) if cpath.is_file() else {})
