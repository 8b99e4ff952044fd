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

from ..rundir import EXPORT_FILES, RunDir
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
        if config:
            self.tracker.store_init_configuration(config)

        self._define_metrics()

    def _define_metrics(self) -> None:
        """Every metric is plotted against ``trainer/step`` (the optimizer step, restored on resume), so a
        resumed run continues at the right step even when wandb's own counter is ahead of the checkpoint;
        summaries keep the best validation values, not the last."""
        r = self.run
        r.define_metric(STEP_METRIC)
        r.define_metric("*", step_metric=STEP_METRIC)
        r.define_metric("train/loss", summary="min,last")
        r.define_metric("val/loss", summary="min,last")
        self._defined = {"train/loss", "val/loss"}

    @property
    def run_id(self) -> str:
        return str(self.run.id)

    def log(self, values: dict[str, Any], step: int) -> None:
        """Scalars under their group (:func:`wandb_name`) at optimizer step ``step``."""
        clean = {wandb_name(k): v for k, v in values.items()
                 if v is not None and not isinstance(v, str) and k not in NOT_METRICS}
        for k in clean:
            if k not in self._defined and k.startswith(("val/", "eval/")) and _higher_is_better(k):
                self.run.define_metric(k, summary="max,last")
                self._defined.add(k)
        self.run.log({**clean, STEP_METRIC: int(step)})

    def log_media(self, step: int, images: dict[str, Path] | None = None,
                  tables: dict[str, tuple[list[str], list[list]]] | None = None) -> None:
        """PNG files as ``wandb.Image`` and ``(columns, rows)`` as ``wandb.Table``, at ``step``."""
        import wandb

        out: dict[str, Any] = {STEP_METRIC: int(step)}
        for k, path in (images or {}).items():
            if Path(path).is_file():
                out[k] = wandb.Image(str(path))
        for k, (cols, rows) in (tables or {}).items():
            out[k] = wandb.Table(columns=list(cols), data=[list(r) for r in rows])
        if len(out) > 1:
            self.run.log(out)

    def log_summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            if v is not None:
                self.run.summary[k] = v

    def log_export(self, folder: Path, step: int, aliases: tuple[str, ...] = ("best",)) -> None:
        """The export folder (``model.safetensors``, ``config.json``, ``model.pt``) as a model artifact."""
        import wandb

        folder = Path(folder)
        files = [folder / f for f in EXPORT_FILES if (folder / f).is_file()]
        if not files:
            return
        art = wandb.Artifact(f"model-{self.run_id}", type="model", metadata={"step": int(step), "folder": str(folder)})
        for f in files:
            art.add_file(str(f))
        self.run.log_artifact(art, aliases=[*aliases, f"step-{int(step)}"])

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


STEP_METRIC = "trainer/step"
NOT_METRICS = frozenset({"step", "time", "kind"})       # wandb keeps its own step and timestamps
_PERF = ("windows_per_s", "node_steps_per_s", "step_time_s", "data_share", "tflops_per_s", "mfu", "elapsed_s")
_MEM = ("mem_", "rss_", "alloc_retries", "ooms")
_GROUPS = ("train/", "val/", "eval/", "perf/", "mem/", "trainer/")


def wandb_name(key: str) -> str:
    """Dashboard name of a telemetry key: ``val/*`` and ``eval/*`` as they are; throughput and FLOPs under
    ``perf/``, memory under ``mem/``, everything else the optimizer step produced (loss terms, lr, grad
    norm, balancer weights) under ``train/`` (``loss`` -> ``train/loss``, ``lr/base`` -> ``train/lr/base``)."""
    if key.startswith(_GROUPS):
        return key
    if key.startswith(_PERF):
        return f"perf/{key}"
    if key.startswith(_MEM):
        return f"mem/{key[4:] if key.startswith('mem_') else key}"
    return f"train/{key}"


def _higher_is_better(key: str) -> bool:
    leaf = key.rsplit("/", 1)[-1].lower()
    return any(w in leaf for w in ("r2", "skill", "pearson", "auroc")) or "skill" in key


def reopen_run(run_dir: Path, logging_cfg, config: dict | None = None, device=None) -> "WandbRun | None":
    """The training run's wandb run, re-opened (same id, ``resume='allow'``) so evaluation and reports land
    in the same notebook; None when wandb is disabled or the run directory records no run id."""
    import json

    mode = resolve_wandb_mode(logging_cfg.wandb)
    env = RunDir(run_dir).environment
    if mode is None or not env.is_file():
        return None
    ids = [json.loads(line).get("run_id") for line in env.read_text().splitlines() if line.strip()]
    ids = [i for i in ids if i]
    if not ids:
        return None
    return WandbRun(project=logging_cfg.project, run_id=ids[-1], name="", run_dir=Path(run_dir), mode=mode,
                    config=config or {}, device=torch.device("cpu") if device is None else device)
