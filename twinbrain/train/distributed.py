"""Process group, device and backend selection.

Accelerate launches the processes and owns the process group and the device.
The sharding backends (FSDP2, DeepSpeed ZeRO) are applied by TwinBrain itself, the
same way on CPU (gloo) and GPU (nccl): Accelerate's own FSDP plugin cannot run on
CPU and its DeepSpeed plugin requires ``transformers``.  So when a launch config asks
for FSDP or DeepSpeed, we read its settings from the environment Accelerate sets,
then hide them from ``Accelerator`` so it only builds a plain data-parallel state.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import logging

import torch
import torch.distributed as dist

from ..config import Config, ConfigError

log = logging.getLogger(__name__)
# FSDP plugin keys of an Accelerate launch config that TwinBrain reads; FSDP2 is applied per block by
# TwinBrain itself, so every other FSDP_* setting has no effect and is reported as such.
_FSDP_READ = ("FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD")

_FSDP_ENV = ("ACCELERATE_USE_FSDP", "FSDP_")
_DS_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_")


@dataclass
class Backend:
    name: str                  # single | ddp | fsdp2 | deepspeed
    zero_stage: int = 0
    ds_config: str = ""        # path of the DeepSpeed JSON
    reshard_after_forward: bool = True

    def record(self) -> dict:
        """What the run actually used, for the environment record (with the DeepSpeed JSON itself)."""
        out = {"backend": self.name, "zero_stage": self.zero_stage}
        if self.name == "fsdp2":
            out["reshard_after_forward"] = self.reshard_after_forward
        if self.ds_config:
            out["ds_config"] = self.ds_config
            out["ds_config_json"] = json.loads(Path(self.ds_config).read_text())
        return out


def resolve_precision(precision: str, env=None) -> str:
    """``train.precision`` combined with Accelerate's ``mixed_precision`` (``ACCELERATE_MIXED_PRECISION``,
    set by a launch config or ``--mixed_precision``): 'no' leaves ``train.precision`` in charge; bf16/fp16
    replaces ``auto`` and must agree with an explicit ``train.precision``."""
    env = os.environ if env is None else env
    launch = str(env.get("ACCELERATE_MIXED_PRECISION", "no")).lower()
    if launch in ("no", ""):
        return precision
    if launch not in ("bf16", "fp16"):
        raise ConfigError(f"Accelerate mixed_precision '{launch}' is not supported; use no, bf16 or fp16 in the "
                          "launch config")
    if precision not in ("auto", launch):
        raise ConfigError(f"train.precision is '{precision}' but the Accelerate launch asks for mixed_precision "
                          f"'{launch}'; make them agree (e.g. --train.precision {launch}) or set mixed_precision: 'no'")
    return launch


def ignored_launch_keys(env=None) -> list[str]:
    """FSDP plugin settings of the launch config that TwinBrain does not read."""
    env = os.environ if env is None else env
    return sorted(k for k in env if k.startswith("FSDP_") and k not in _FSDP_READ)


def _truthy(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def resolve_backend(cfg: Config, world_size: int | None = None) -> Backend:
    """Pick the backend: explicit ``parallel.backend`` wins, else the Accelerate launch config."""
    env = os.environ
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", "1"))
    p = cfg.parallel
    name = p.backend
    stage = p.zero_stage
    ds_config = p.ds_config
    reshard = p.reshard_after_forward
    if name == "auto":
        if _truthy(env.get("ACCELERATE_USE_FSDP")):
            for key in ignored_launch_keys(env):
                log.warning("launch config: %s=%s is ignored (TwinBrain applies FSDP2 per block itself; only "
                            "fsdp_version and fsdp_reshard_after_forward are read)", key, env[key])
        if _truthy(env.get("ACCELERATE_USE_DEEPSPEED")):
            name = "deepspeed"
            ds_config = ds_config or env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
            if not stage:
                stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
        elif _truthy(env.get("ACCELERATE_USE_FSDP")):
            name = "fsdp2"
            if env.get("FSDP_VERSION", "2") != "2":
                raise ConfigError("FSDP_VERSION: TwinBrain supports FSDP2 only; set fsdp_version: 2 "
                                  "in the Accelerate config")
            reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "no_shard")
        else:
            name = "ddp" if world_size > 1 else "single"
    if name == "deepspeed":
        if ds_config and not stage:
            stage = int(json.loads(Path(ds_config).read_text()).get("zero_optimization", {}).get("stage", 0))
        if stage not in (1, 2, 3):
            raise ConfigError(f"parallel.zero_stage: DeepSpeed needs ZeRO stage 1, 2 or 3 (got {stage}); "
                              "set it or use a ds_configs/zero<N>.json launch config")
        if not ds_config:
            ds_config = str(Path(__file__).resolve().parents[2] / "ds_configs" /
                            (f"zero{stage}_offload.json" if p.offload else f"zero{stage}.json"))
        if not Path(ds_config).is_file():
            raise ConfigError(f"parallel.ds_config: DeepSpeed config {ds_config} not found")
    if name == "single" and world_size > 1:
        raise ConfigError(f"parallel.backend 'single' but {world_size} processes were launched; "
                          "use ddp, fsdp2 or deepspeed")
    if name in ("fsdp2", "deepspeed") and cfg.train.balancer == "gradnorm":
        raise ConfigError("train.balancer: gradnorm needs unsharded parameters (single or ddp); "
                          "use 'uncertainty' with fsdp2/deepspeed")
    return Backend(name=name, zero_stage=stage, ds_config=ds_config, reshard_after_forward=reshard)


def hide_sharding_env() -> None:
    """Stop Accelerate from building its own FSDP/DeepSpeed plugins (we apply them ourselves)."""
    for key in list(os.environ):
        if key.startswith(_FSDP_ENV) or key.startswith(_DS_ENV):
            del os.environ[key]


def make_accelerator():
    """An Accelerator for process group + device; CPU (gloo) when no GPU is present."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    hide_sharding_env()
    # configs/accelerate/cpu.yaml sets ACCELERATE_USE_CPU: honour it on GPU machines too (gloo, no NCCL).
    use_cpu = not torch.cuda.is_available() or _truthy(os.environ.get("ACCELERATE_USE_CPU"))
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if use_cpu:
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        handlers.append(InitProcessGroupKwargs(backend="gloo" if use_cpu else "nccl",
                                               timeout=datetime.timedelta(minutes=30)))
    return Accelerator(cpu=use_cpu, kwargs_handlers=handlers, mixed_precision="no")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (no-op without a process group). ``op``: sum | max | min | avg."""
    if is_dist() and dist.get_world_size() > 1:
        if op == "avg":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= dist.get_world_size()
        else:
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                        "min": dist.ReduceOp.MIN}[op])
    return tensor


def barrier() -> None:
    if is_dist():
        dist.barrier()


def clean_exit(code: int = 0) -> None:
    """End a worker with ``code`` without the interpreter's own teardown, where gloo/c10d can abort an
    otherwise finished job at exit: the process group is destroyed, output flushed, then ``os._exit``."""
    if is_dist():
        try:
            dist.destroy_process_group()
        except Exception:  # teardown errors must not mask the run's own exit code
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
