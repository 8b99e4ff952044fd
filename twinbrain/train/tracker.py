"""Experiment tracker (wandb through Accelerate's ``WandBTracker``) and run environment.

Only the main rank ever creates a tracker.  Without an API key runs go offline
(``wandb sync RUN_DIR/wandb/offline-run-*`` uploads them later), so training never
depends on the network.
"""
from __future__ import annotations

import logging
import netrc
import os
import platform
import secrets
import socket
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .meters import PEAK_BASIS, peak_tflops

log = logging.getLogger(__name__)

_ID_CHARS = string.ascii_lowercase + string.digits


def generate_run_id() -> str:
    """An 8-character id in wandb's alphabet, so a run started without wandb can later use it."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(8))


def wandb_api_key_configured(env: dict[str, str] | None = None) -> bool:
    """True if ``WANDB_API_KEY`` is set or a netrc file holds credentials for the wandb host.

    Reads only local files (``$NETRC`` or ``~/.netrc``); never contacts a server.
    """
    env = dict(os.environ) if env is None else env
    if env.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(env.get("NETRC", "") or Path.home() / ".netrc").expanduser()
    try:
        auth = netrc.netrc(str(path)).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(setting: str, env: dict[str, str] | None = None) -> str | None:
    """``logging.wandb`` -> ``'online' | 'offline' | None`` (None = no wandb at all).

    ``auto`` honours an explicit ``WANDB_MODE`` in the environment, else goes online only
    when an API key is configured.
    """
    env = dict(os.environ) if env is None else env
    if setting == "disabled":
        return None
    if setting in ("online", "offline"):
        return setting
    if setting != "auto":
        raise ValueError(f"logging.wandb: '{setting}' is not one of auto, online, offline, disabled")
    forced = env.get("WANDB_MODE", "").strip().lower()
    if forced in ("disabled",):
        return None
    if forced in ("offline", "dryrun"):
        return "offline"
    if forced == "online":
        return "online"
    return "online" if wandb_api_key_configured(env) else "offline"


def collect_environment(device: torch.device, world_size: int, backend: str) -> dict[str, Any]:
    """Versions, devices and parallel layout, logged with the config so runs stay comparable."""
    cuda = device.type == "cuda" and torch.cuda.is_available()
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or device.type
    peak, peak_label = peak_tflops(name if cuda else "cpu")
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "device_type": device.type,
        "device_name": name,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "device_names": sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        if cuda else [name],
        "device_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
        "world_size": int(world_size),
        "backend": backend,
        "peak_tflops": peak,
        "peak_device": peak_label,
        "peak_basis": PEAK_BASIS,
    }
    try:
        import accelerate
        env["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    return env


class WandbRun:
    """A wandb run on the main rank, opened through Accelerate's ``WandBTracker``.

    ``resume='allow'`` with a fixed id: a first start creates run ``run_id``; a restart
    with the id saved in the checkpoint appends to the same run.  If an online start
    fails (no network, bad key) it retries offline rather than stopping training.
    """

    def __init__(self, *, project: str, run_id: str, name: str, run_dir: Path, mode: str,
                 config: dict[str, Any], device: torch.device):
        from accelerate import PartialState
        from accelerate.tracking import WandBTracker

        if not PartialState._shared_state:
            # Accelerate's tracker logs through its process-aware logger, which needs the state the
            # trainer's Accelerator creates; scripts and tests without one get a one-process state.
            PartialState(cpu=device.type == "cpu")

        self.mode = mode
        kwargs = dict(id=run_id, resume="allow", name=name or None, dir=str(run_dir), mode=mode)
        try:
            self.tracker = WandBTracker(project, **kwargs)
            self.tracker.start()
        except Exception as exc:  # noqa: BLE001 - any failure to reach wandb must not kill training
            if mode != "online":
                raise
            log.warning("wandb online start failed (%s); continuing offline - sync later with "
                        "`wandb sync %s/wandb/offline-run-*`", exc, run_dir)
            self.mode = kwargs["mode"] = "offline"
            self.tracker = WandBTracker(project, **kwargs)
            self.tracker.start()
        self.run = self.tracker.run
        # allow_val_change: a resumed run may carry an edited config (e.g. more steps).
        self.tracker.store_init_configuration(config)

    @property
    def run_id(self) -> str:
        return str(self.run.id)

    def log(self, values: dict[str, Any], step: int) -> None:
        clean = {k: v for k, v in values.items() if v is not None and not isinstance(v, str)}
        self.tracker.log(clean, step=int(step))

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
