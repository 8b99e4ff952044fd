"""An exclusive lock on a run directory, held for the life of the run.

``RUN/.lock`` is locked with ``flock`` (released by the kernel when the holder dies, however it dies)
and holds the holder's host, pid and start time, so a second launch is refused at once, naming who
holds the directory. A lock file whose content outlived its holder (killed, host rebooted) is
reported as stale and taken over.

The lock belongs to the process: several ``Trainer`` objects of one process (tests, notebooks) may
hold the same directory; it is released when the last one releases it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import ClassVar

from ..config import ConfigError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


class RunDirLocked(ConfigError):
    """Another process holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``acquire()`` or raise ``RunDirLocked``; ``release()`` when the run ends (idempotent)."""

    # path -> [fd, holders in this process]: a flock is per open file, so one per process and path.
    _held: ClassVar[dict[str, list[int]]] = {}

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._key = str(self.path.resolve())
        self._mine = False

    def acquire(self) -> None:
        if self._mine:
            return
        held = self._held.get(self._key)
        if held is not None:
            held[1] += 1
            self._mine = True
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise RunDirLocked(
                f"{self.path.parent} is in use by {self._describe(holder)}; wait for that run to end, stop it, "
                "or choose another --run.out") from None
        previous = self._read(fd)
        if previous:
            pid, host = previous.get("pid"), previous.get("host")
            state = ("no longer running" if host == socket.gethostname() and isinstance(pid, int)
                     and not _alive(pid) else "its lock was not released")
            log.warning("run directory %s: stale lock of %s (%s); taking it over", self.path.parent,
                        self._describe(previous), state)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode(), 0)
        os.fsync(fd)
        self._held[self._key] = [fd, 1]
        self._mine = True

    def release(self) -> None:
        if not self._mine:
            return
        self._mine = False
        held = self._held[self._key]
        held[1] -= 1
        if held[1] == 0:
            del self._held[self._key]
            os.ftruncate(held[0], 0)       # an empty lock file marks a clean release
            os.close(held[0])

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            text = os.pread(fd, 4096, 0).decode()
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {"host": "?", "pid": "?", "since": "?"}

    @staticmethod
    def _describe(holder: dict) -> str:
        return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(since {holder.get('since', '?')})")
