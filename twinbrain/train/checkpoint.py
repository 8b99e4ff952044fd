"""Checkpoints that make a relaunch resume exactly, under every backend.

Layout of ``<run>/checkpoints/step-XXXXXXXX/``:
  ``dcp/``              model + optimizer via ``torch.distributed.checkpoint`` (single, DDP, FSDP2)
  ``ds/``               DeepSpeed engine checkpoint (model, optimizer, ZeRO partitions)
  ``trainer.pt``        the trainer's counters (step, skipped steps, best metric, tracker run id) at the
                        top level, and one key per shared state: schedule, early stopping, scaler (rank 0)
  ``rank-R.pt``         one key per per-rank state: data-loader position, RNG states (every rank)
  ``meta.json``         world size, backend, step, config, subject/session maps
  ``MANIFEST.json``     every file above with its size and SHA-256
  ``COMPLETE``          written last: a checkpoint without it is ignored

A checkpoint is written into ``step-X.partial`` and renamed once every rank has finished,
so a crash mid-save never leaves a directory that looks complete. At load, every rank checks the
manifest (sizes of all files, checksums of its share) and the ranks agree on the verdict; a damaged
checkpoint is renamed ``step-X.damaged`` (kept for inspection, never deleted) and the newest intact
one is used instead.

Everything but the model and optimizer (which the backend object saves its own way) is *stateful*: an
object with ``state_dict()`` / ``load_state_dict(state)``, handed to :meth:`Checkpointer.register` by name
(torchtitan's pattern); the checkpointer saves and restores them all the same way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from .distributed import barrier, is_dist

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"step-\d{8}")
log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _world() -> tuple[int, int]:
    if is_dist():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (so every rank acts on the same list or verdict)."""
    if is_dist() and torch.distributed.get_world_size() > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _gather(obj: Any) -> list[Any]:
    if is_dist() and torch.distributed.get_world_size() > 1:
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def write_manifest(ckpt: Path) -> None:
    """Collective: list every file of ``ckpt`` with size and SHA-256 into ``MANIFEST.json``.

    Rank 0 lists the files; each rank hashes every world-size-th one; rank 0 writes the result.
    """
    rank, world = _world()
    names = _from_rank0(sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
                        if rank == 0 else None)
    mine = {n: {"bytes": (ckpt / n).stat().st_size, "sha256": _sha256(ckpt / n)} for n in names[rank::world]}
    files: dict[str, dict] = {}
    for part in _gather(mine):
        files.update(part)
    if rank == 0:
        tmp = ckpt / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"files": dict(sorted(files.items()))}, indent=1))
        tmp.replace(ckpt / MANIFEST)


def verify_checkpoint(ckpt: Path) -> str | None:
    """Collective: None if ``ckpt`` matches its manifest on every rank, else the first problem found.

    Every rank checks that every file exists with its recorded size, and the checksums of every
    world-size-th file; the verdict is the same on all ranks.
    """
    rank, world = _world()
    problem = None
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        # Written before manifests existed: nothing to check against (the first save adds one).
        log.warning("checkpoint %s has no %s; loading it unverified", ckpt, MANIFEST)
        files = {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problem = f"{MANIFEST} missing or unreadable ({exc.__class__.__name__})"
        files = {}
    for i, (name, want) in enumerate(files.items()):
        path = ckpt / name
        if not path.is_file():
            problem = f"{name} is missing"
        elif path.stat().st_size != want["bytes"]:
            problem = f"{name} has {path.stat().st_size} bytes, the manifest says {want['bytes']}"
        elif i % world == rank and _sha256(path) != want["sha256"]:
            problem = f"{name} does not match its SHA-256 checksum"
        if problem:
            break
    found = [p for p in _gather(problem) if p]
    return found[0] if found else None


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


class Stateful(Protocol):
    """What the checkpointer saves: anything with ``state_dict`` and ``load_state_dict``."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RNGState:
    """This process's Python, NumPy, torch and CUDA random generators, as a :class:`Stateful`."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)
             and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


class Checkpointer:
    """Saves and restores the whole training state; every rank takes part."""

    def __init__(self, root: Path, kind, rank: int, world_size: int, keep: int):
        """``kind``: the backend object (:mod:`twinbrain.train.backends`) that saves and loads the model and
        optimizer state its own way."""
        self.root, self.kind, self.rank, self.world_size, self.keep = root, kind, rank, world_size, keep
        self.backend = kind.name
        self.counters: Stateful | None = None
        self.shared: dict[str, Stateful | None] = {}
        self.per_rank: dict[str, Stateful] = {}

    def register(self, counters: Stateful, shared: Mapping[str, Stateful | None],
                 per_rank: Mapping[str, Stateful]) -> None:
        """What the checkpoints hold besides model and optimizer (restored in this order, ``per_rank`` last):

        ``counters``: its state's keys lie at the top level of ``trainer.pt`` (the trainer's counters);
        ``shared``: the same on every rank, saved by rank 0 as ``trainer.pt[name]`` (``None``: not in
        this run, saved as ``None`` and not restored, e.g. the fp16 grad scaler); ``per_rank``: saved by
        every rank as ``rank-R.pt[name]`` (data-loader position, RNG states).
        """
        clash = set(counters.state_dict()) & set(shared)
        if clash:
            raise ValueError(f"checkpoint states {sorted(clash)} are both counters and shared states")
        self.counters, self.shared, self.per_rank = counters, dict(shared), dict(per_rank)

    # ------------------------------------------------------------ save
    def save(self, step: int, module: nn.Module, optimizer, meta: dict) -> Path:
        """Collective: write checkpoint ``step`` (model, optimizer and every registered state)."""
        if self.counters is None:
            raise RuntimeError("Checkpointer.save before register(): nothing would resume the trainer")
        # Every state is taken before any file is written (saving draws no random numbers, but taking the
        # RNG states first makes sure of it).
        trainer_state = {**self.counters.state_dict(),
                         **{k: v.state_dict() if v is not None else None for k, v in self.shared.items()}}
        rank_state = {k: v.state_dict() for k, v in self.per_rank.items()}
        final = _step_dir(self.root, step)
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        barrier()
        self.kind.save(module, optimizer, partial)
        torch.save(rank_state, partial / f"rank-{self.rank}.pt")
        if self.rank == 0:
            torch.save(trainer_state, partial / "trainer.pt")
            (partial / "meta.json").write_text(json.dumps(
                {**meta, "step": step, "world_size": self.world_size, "backend": self.backend},
                indent=2, default=str))
        barrier()
        write_manifest(partial)
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
    def newest_intact(self) -> Path | None:
        """Collective: the newest complete checkpoint that matches its manifest (None if there is none).

        A damaged newer one is reported by path, renamed ``step-X.damaged`` (so a later save of the
        same step cannot overwrite it) and skipped, identically on every rank.
        """
        candidates = _from_rank0([str(p) for p in complete_checkpoints(self.root)] if self.rank == 0 else None)
        for path in map(Path, reversed(candidates)):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            if self.rank == 0:
                kept, n = path.with_name(path.name + ".damaged"), 1
                while kept.exists():
                    n += 1
                    kept = path.with_name(f"{path.name}.damaged{n}")
                path.rename(kept)
                log.warning("checkpoint %s is damaged: %s; kept as %s for inspection, trying the previous "
                            "checkpoint", path, problem, kept)
            barrier()
        return None

    def check_compatible(self, path: Path) -> dict:
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != self.world_size:
            raise ConfigError(
                f"{path}: saved with {meta['world_size']} processes, relaunched with {self.world_size}. "
                "Per-rank data-loader positions cannot be remapped exactly; relaunch with "
                f"--num_processes {meta['world_size']}, or start a new run directory "
                "(initialise from the exported best/model.pt)")
        if meta["backend"] != self.backend:
            raise ConfigError(f"{path}: saved with backend '{meta['backend']}', relaunched with "
                               f"'{self.backend}'; use the same launch config to resume")
        return meta

    def load(self, path: Path, module: nn.Module, optimizer) -> None:
        """Collective: restore model and optimizer, then every registered state, in place."""
        if self.counters is None:
            raise RuntimeError("Checkpointer.load before register(): the trainer's state would not be restored")
        self.check_compatible(path)
        self.kind.load(module, optimizer, path)
        trainer_state = torch.load(path / "trainer.pt", weights_only=False)
        rank_state = torch.load(path / f"rank-{self.rank}.pt", weights_only=False)
        barrier()
        self.counters.load_state_dict(trainer_state)
        for name, obj in self.shared.items():
            if obj is None:
                continue
            if name not in trainer_state:
                raise KeyError(f"{path / 'trainer.pt'} holds no '{name}' state; resume from a checkpoint of "
                               f"this version, or start a new --run.out")
            if trainer_state[name] is not None:         # None: the saving run had no such state
                obj.load_state_dict(trainer_state[name])
        for name, obj in self.per_rank.items():
            obj.load_state_dict(rank_state[name])


def full_model_state(module: nn.Module, kind) -> dict[str, torch.Tensor] | None:
    """Consolidated (unsharded) fp32 CPU weights of the whole train module, on rank 0 (None elsewhere);
    ``kind``: the backend object that gathers them.

    Every rank must call this (FSDP2 and ZeRO-3 gather shards collectively).
    """
    rank = torch.distributed.get_rank() if is_dist() else 0
    sd = kind.full_state(module)
    if rank != 0:
        return None
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}
