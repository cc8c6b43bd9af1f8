"""Prefect's file-system cache locks, made safe against runs that die while holding one."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from prefect.locking.filesystem import FileSystemLockManager


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class ProcessAwareLockManager(FileSystemLockManager):
    """File locks that a dead process cannot hold forever.

    Prefect takes cache locks with no expiry, so a run killed mid-stage (SIGKILL, OOM killer, a lost
    machine) would block every later run of that stage. Each lock gets an owner file (host, pid); a lock
    whose owner process on this host is gone counts as free. Locks held from other hosts are trusted.
    """

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            self._owner_file(key).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        return acquired

    def release_lock(self, key: str, holder: str) -> None:
        super().release_lock(key, holder)
        self._owner_file(key).unlink(missing_ok=True)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        if super().is_locked(key, use_cache) and not self._owner_is_dead(key):
            return True
        if Path(self._lock_path_for_key(key)).exists() and self._owner_is_dead(key):
            Path(self._lock_path_for_key(key)).unlink(missing_ok=True)
            self._owner_file(key).unlink(missing_ok=True)
            self._locks.pop(key, None)
        return False

    def _owner_file(self, key: str) -> Path:
        return Path(self._lock_path_for_key(key)).with_suffix(".owner")

    def _owner_is_dead(self, key: str) -> bool:
        try:
            owner = json.loads(self._owner_file(key).read_text())
        except (OSError, ValueError):
            return False  # no owner recorded (yet): trust the lock
        return owner.get("host") == socket.gethostname() and not _alive(int(owner["pid"]))
