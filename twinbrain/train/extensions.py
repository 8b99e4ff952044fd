"""A per-environment cache for the C++ ops DeepSpeed compiles on first use (JIT).

DeepSpeed builds e.g. ``shm_comm`` with ``torch.utils.cpp_extension`` into ``TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``, shared by every environment on the machine, so jobs in two
virtual environments rebuild it under each other). Unless the user set ``TORCH_EXTENSIONS_DIR``,
TwinBrain points it into the running environment (``<sys.prefix>/torch_extensions``).

A build killed midway leaves ``<op>/lock`` behind and every later build of that op waits on it
forever; a lock older than any build is refused here with the command that removes it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from ..config import ConfigError

log = logging.getLogger(__name__)
# Longest first-run build measured on a loaded 2-core machine: 6.5 min (docs/TRAINING.md).
STALE_LOCK_S = 20 * 60


class StaleExtensionLock(ConfigError):
    """A JIT-build lock left by a killed build."""


def extension_dir() -> Path:
    """Set ``TORCH_EXTENSIONS_DIR`` to this environment's cache unless the user chose one; return it."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def _locks(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/lock")) + sorted(root.glob("*/lock")) if root.is_dir() else []


def check_stale_locks(root: Path, max_age_s: float = STALE_LOCK_S, now: float | None = None) -> None:
    """Raise ``StaleExtensionLock`` for a build lock under ``root`` older than ``max_age_s`` seconds."""
    now = time.time() if now is None else now
    for lock in _locks(root):
        age = now - lock.stat().st_mtime
        if age > max_age_s:
            raise StaleExtensionLock(
                f"{lock} is {age / 60:.0f} min old, older than any build of the op (a build was killed "
                f"midway); DeepSpeed would wait on it forever. Remove it (rm {lock}) if no build is "
                "running, then relaunch")
        log.info("JIT build lock %s is %.0f s old: another process is building the op; waiting for it",
                 lock, age)


def _exit_stale(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)            # the main thread is blocked inside DeepSpeed's wait on the lock


@contextlib.contextmanager
def watch_build_locks(root: Path, max_age_s: float = STALE_LOCK_S, interval_s: float = 30.0,
                      on_stale: Callable[[str], None] = _exit_stale) -> Iterator[None]:
    """While the body runs (DeepSpeed initialising), check every ``interval_s`` seconds for a build lock
    older than ``max_age_s``: a build that another process was running when we started and that died
    since. ``on_stale(message)`` is called once; by default it prints the message and exits with 2.
    """
    done = threading.Event()

    def watch() -> None:
        while not done.wait(interval_s):
            try:
                check_stale_locks(root, max_age_s)
            except StaleExtensionLock as exc:
                on_stale(str(exc))
                return

    thread = threading.Thread(target=watch, name="jit-lock-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def prepare_extensions() -> Path:
    """Per-environment extension cache with no stale lock; call before DeepSpeed is initialised."""
    root = extension_dir()
    check_stale_locks(root)
    return root
