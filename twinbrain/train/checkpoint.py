"""Checkpoints that make a relaunch resume exactly, under every backend.

Layout of ``<run>/checkpoints/step-XXXXXXXX/``:
  ``dcp/``              model + optimizer via ``torch.distributed.checkpoint`` (single, DDP, FSDP2)
  ``ds/``               DeepSpeed engine checkpoint (model, optimizer, ZeRO partitions)
  ``trainer.pt``        step counters, schedule, early stopping, scaler, tracker run id (rank 0)
  ``rank-R.pt``         per-rank RNG states and data-loader position (every rank)
  ``meta.json``         world size, backend, step, config, subject/session maps
  ``COMPLETE``          written last: a checkpoint without it is ignored

A checkpoint is written into ``step-X.partial`` and renamed once every rank has finished,
so a crash mid-save never leaves a directory that looks complete.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..weights import save_weights
from .distributed import barrier, is_dist

COMPLETE = "COMPLETE"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and not p.name.endswith(".partial") and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


class Checkpointer:
    """Saves and restores the whole training state; every rank takes part."""

    def __init__(self, root: Path, backend: str, rank: int, world_size: int, keep: int):
        self.root, self.backend, self.rank, self.world_size, self.keep = root, backend, rank, world_size, keep

    # ------------------------------------------------------------ save
    def save(self, step: int, module: nn.Module, optimizer, trainer_state: dict, rank_state: dict,
             meta: dict) -> Path:
        final = _step_dir(self.root, step)
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        barrier()
        if self.backend == "deepspeed":
            module.save_checkpoint(str(partial / "ds"), tag="state", client_state={},
                                   save_latest=False)
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(module, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(partial / "dcp"))
        torch.save(rank_state, partial / f"rank-{self.rank}.pt")
        if self.rank == 0:
            torch.save(trainer_state, partial / "trainer.pt")
            (partial / "meta.json").write_text(json.dumps(
                {**meta, "step": step, "world_size": self.world_size, "backend": self.backend},
                indent=2, default=str))
        barrier()
        if self.rank == 0:
            (partial / COMPLETE).write_text(str(step))
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            for old in complete_checkpoints(self.root)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    # ------------------------------------------------------------ load
    def check_compatible(self, path: Path) -> dict:
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != self.world_size:
            raise RuntimeError(
                f"{path}: saved with {meta['world_size']} processes, relaunched with {self.world_size}. "
                "Per-rank data-loader positions cannot be remapped exactly; relaunch with "
                f"--num_processes {meta['world_size']}, or start a new run directory "
                "(initialise from the exported best/model.pt).")
        if meta["backend"] != self.backend:
            raise RuntimeError(f"{path}: saved with backend '{meta['backend']}', relaunched with "
                               f"'{self.backend}'; use the same launch config to resume")
        return meta

    def load(self, path: Path, module: nn.Module, optimizer) -> tuple[dict, dict]:
        """Restore model and optimizer in place; return ``(trainer_state, rank_state)``."""
        self.check_compatible(path)
        if self.backend == "deepspeed":
            load_path, _ = module.load_checkpoint(str(path / "ds"), tag="state",
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
            if load_path is None:
                raise RuntimeError(f"{path / 'ds'}: DeepSpeed could not load the checkpoint")
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(module, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(path / "dcp"))
            set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        trainer_state = torch.load(path / "trainer.pt", weights_only=False)
        rank_state = torch.load(path / f"rank-{self.rank}.pt", weights_only=False)
        barrier()
        return trainer_state, rank_state


def full_model_state(module: nn.Module, backend: str) -> dict[str, torch.Tensor] | None:
    """Consolidated (unsharded) fp32 CPU weights of the whole train module, on rank 0 (None elsewhere).

    Every rank must call this (FSDP2 and ZeRO-3 gather shards collectively).
    """
    rank = torch.distributed.get_rank() if is_dist() else 0
    if backend == "deepspeed":
        if module.zero_optimization_partition_weights():
            sd = module._zero3_consolidated_16bit_state_dict()
        else:
            sd = module.module.state_dict()
    elif backend == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        inner = getattr(module, "module", module)
        sd = inner.state_dict()
    if rank != 0:
        return None
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}


def export_model(path: Path, model_state: dict[str, torch.Tensor], payload: dict) -> None:
    """Write a single-file model for inference atomically: weights + everything to rebuild it; and, beside
    it, the same weights as ``model.safetensors`` with ``config.json`` (:mod:`twinbrain.weights`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model_state, **payload}, tmp)
    tmp.replace(path)
    save_weights(path.parent, model_state, config=payload.get("config", {}), metadata=payload.get("data"),
                 step=payload.get("step", 0), metrics=payload.get("metrics"))
