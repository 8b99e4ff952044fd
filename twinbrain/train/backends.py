"""One object per training backend: how it wraps the train module, runs a micro-batch, steps, and saves.

The Trainer's step is one path over these methods; the checkpointer asks the backend how to save and
load the model and optimizer. A new backend is one class here (plus its launch config and a test row).

    kind = make_backend(backend, accelerator, dtype)           # Single | DDP | FSDP2 | DeepSpeed
    module, optimizer, base_optimizer = kind.wrap(train_module, cfg, build_optim, ext_dir)
    data_scale, reg_scale = kind.scales(world, n_micro)
    with kind.no_sync(module, last):
        loss, parts = kind.forward(module, batch, counts, data_scale, reg_scale, device)
        kind.backward(module, loss, scaler, step, device)
    grad_norm, stepped = kind.step(module, optimizer, scaler, loss_sum, grad_clip, device)
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import Config, ConfigError
from ..schema import MODALITIES
from ..model.coupling import LinearCore
from .distributed import Backend, all_reduce_
from .extensions import watch_build_locks
from .parallel import deepspeed_config, wrap_ddp, wrap_deepspeed, wrap_fsdp2



def drop_unsaved_optimizer_states(optim_sd: dict, saved) -> None:
    """Remove from the optimizer state ``get_state_dict`` expects the parameters the checkpoint holds no
    state for: a parameter that never received a gradient (the EEG heads of an fMRI-only cohort, the
    unused coefficients of a transfer / auto core) has no optimizer state when saved, but a fresh
    optimizer's expected state lists every parameter. Model weights stay required."""
    held = {key[len("optim.state."):].rsplit(".", 1)[0] for key in saved if key.startswith("optim.state.")}
    state = optim_sd.get("state", {})
    for fqn in [k for k in state if k not in held]:
        del state[fqn]

class Single:
    """One process, or the base every backend refines: autocast forward, plain backward, clip and step."""

    name = "single"
    sharded = False          # parameters (and the balancer's) live sharded across ranks
    uses_scaler = True       # fp16 needs a GradScaler (DeepSpeed scales on its own)
    jit_extensions = False   # builds C++ ops at start-up (needs the per-environment extension cache)

    def __init__(self, backend: Backend, accelerator, dtype: torch.dtype | None,
                 modalities: tuple[str, ...] = MODALITIES):
        self.backend, self.accelerator, self.dtype = backend, accelerator, dtype
        self.modalities = tuple(modalities)

    # ------------------------------------------------------------ build
    def wrap(self, module: nn.Module, cfg: Config, build_optim: Callable[[], torch.optim.Optimizer],
             ext_dir: Path | None):
        """``(module to call, optimizer to step, the torch optimizer underneath)``."""
        module = self.wrap_module(module)
        optimizer = build_optim()
        return module, optimizer, optimizer

    def wrap_module(self, module: nn.Module) -> nn.Module:
        return module

    # ------------------------------------------------------------ one step
    def scales(self, world: int, n_micro: int) -> tuple[float, float]:
        """``(data_scale, reg_scale)`` the train module divides by: gradients are averaged over ranks."""
        return float(world), 1.0 / n_micro

    def no_sync(self, module: nn.Module, last: bool):
        """Context of one micro-batch: gradient synchronisation may wait for the last one."""
        return contextlib.nullcontext()

    def forward(self, module: nn.Module, batch, counts, data_scale: float, reg_scale: float,
                device: torch.device):
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return module(batch, counts, data_scale, reg_scale)

    def backward(self, module: nn.Module, loss: torch.Tensor, scaler, step: int, device: torch.device) -> None:
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, module: nn.Module, optimizer, scaler, loss_sum: torch.Tensor, grad_clip: float,
             device: torch.device) -> tuple[float, bool]:
        """Clip, then step unless a rank saw a non-finite loss or gradient -> ``(grad_norm, stepped)``."""
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        max_norm = grad_clip if grad_clip > 0 else float("inf")
        grad_norm_t = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm_t, "full_tensor"):
            grad_norm_t = grad_norm_t.full_tensor()
        ok = torch.tensor([float(torch.isfinite(grad_norm_t) and torch.isfinite(loss_sum))], device=device)
        stepped = all_reduce_(ok, "min").item() > 0
        grad_norm = float(grad_norm_t)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        elif stepped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, stepped

    # ------------------------------------------------------------ state
    def save(self, module: nn.Module, optimizer, folder: Path) -> None:
        """Model and optimizer state of this rank into the checkpoint ``folder`` (collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(module, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder / "dcp"))

    def load(self, module: nn.Module, optimizer, folder: Path) -> None:
        """Restore what :meth:`save` wrote, in place (collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(module, optimizer)
        saved = dcp.FileSystemReader(str(folder / "dcp")).read_metadata().state_dict_metadata
        missing = [k for k in model_sd if f"model.{k}" not in saved]
        if missing:
            raise ConfigError(f"{folder}: holds no weight '{missing[0]}' ({len(missing)} missing): it was written by "
                              "a TwinBrain version with another parameter layout and cannot be resumed; start a new "
                              "--run.out (the run's exported best/ and final/ models still load)")
        drop_unsaved_optimizer_states(optim_sd, saved)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        # Not strict: parameters without saved optimizer state (above) keep a fresh one; the model state is
        # complete, dcp.load has required every model key.
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))

    def full_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The whole (unsharded) state dict of the train module (collective; rank 0 keeps it)."""
        return getattr(module, "module", module).state_dict()


class DDP(Single):
    """Data parallel through Accelerate: gradients all-reduced on the last micro-batch only."""

    name = "ddp"

    def wrap_module(self, module: nn.Module) -> nn.Module:
        # A cohort without one modality leaves that modality's heads out of the loss; a transfer / auto
        # linear core (model.core) holds the VAR's and the flow's coefficients and uses one of them.
        two_cores = any(isinstance(c, LinearCore) and c.core != "var" for c in module.modules())
        return wrap_ddp(module, self.accelerator, find_unused=len(self.modalities) < 2 or two_cores)

    def no_sync(self, module: nn.Module, last: bool):
        return contextlib.nullcontext() if last else module.no_sync()


class FSDP2(Single):
    """``fully_shard`` per STBlock, then the root; the full state is gathered for an export."""

    name = "fsdp2"
    sharded = True

    def wrap_module(self, module: nn.Module) -> nn.Module:
        return wrap_fsdp2(module, module.model.blocks, self.backend, self.dtype)

    def full_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class DeepSpeed(Single):
    """The DeepSpeed engine owns backward, accumulation, clipping and the step (ZeRO-1/2/3)."""

    name = "deepspeed"
    sharded = True
    uses_scaler = False
    jit_extensions = True

    def wrap(self, module: nn.Module, cfg: Config, build_optim, ext_dir: Path | None):
        optimizer = build_optim()
        # ZeRO partitions the trainable parameters of each group and refuses a group without one.
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if any(p.requires_grad for p in g["params"])]
        with watch_build_locks(ext_dir):     # DeepSpeed may JIT-build (and wait on a lock) here
            engine, ds_optimizer = wrap_deepspeed(module, optimizer, deepspeed_config(cfg, self.backend, self.dtype))
        return engine, ds_optimizer, optimizer

    def scales(self, world: int, n_micro: int) -> tuple[float, float]:
        # DeepSpeed also divides the gradient by the accumulation steps.
        return float(world * n_micro), 1.0

    def forward(self, module: nn.Module, batch, counts, data_scale: float, reg_scale: float,
                device: torch.device):
        if self.dtype is not None:
            for m in MODALITIES:            # DeepSpeed bf16 does not autocast the inputs
                batch[m].x = batch[m].x.to(self.dtype)
        with torch.autocast(device.type, dtype=self.dtype, enabled=False):
            return module(batch, counts, data_scale, reg_scale)

    def backward(self, module: nn.Module, loss: torch.Tensor, scaler, step: int, device: torch.device) -> None:
        finite = all_reduce_(torch.tensor([float(torch.isfinite(loss))], device=device), "min")
        if finite.item() < 1:
            raise FloatingPointError(
                f"non-finite loss at step {step} under DeepSpeed, which cannot skip a "
                "step; lower train.lr or use fp32, then resume from the last checkpoint")
        module.backward(loss)
        module.step()

    def step(self, module: nn.Module, optimizer, scaler, loss_sum: torch.Tensor, grad_clip: float,
             device: torch.device) -> tuple[float, bool]:
        return float(module.get_global_grad_norm() or 0.0), True

    def save(self, module: nn.Module, optimizer, folder: Path) -> None:
        module.save_checkpoint(str(folder / "ds"), tag="state", client_state={}, save_latest=False)

    def load(self, module: nn.Module, optimizer, folder: Path) -> None:
        load_path, _ = module.load_checkpoint(str(folder / "ds"), tag="state",
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"{folder / 'ds'}: DeepSpeed could not load the checkpoint")

    def full_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        if module.zero_optimization_partition_weights():
            return module._zero3_consolidated_16bit_state_dict()
        return module.module.state_dict()


KINDS = {kind.name: kind for kind in (Single, DDP, FSDP2, DeepSpeed)}


def make_backend(backend: Backend, accelerator, dtype: torch.dtype | None) -> Single:
    """The backend object for ``backend.name`` (single | ddp | fsdp2 | deepspeed); the trainer sets
    ``modalities`` once the data are known."""
    return KINDS[backend.name](backend, accelerator, dtype)
