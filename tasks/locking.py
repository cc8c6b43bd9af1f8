"""Cache locks for the stage tasks: file locks on one host, leased Redis locks across hosts.

Both are safe against runs that die while holding a lock."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

from prefect.locking.filesystem import FileSystemLockManager
from prefect_redis.locking import RedisLockManager
from redis.exceptions import LockError

from oliveflow.config import oliveflow_home


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


class LeasedRedisLockManager(RedisLockManager):
    """prefect-redis locks on a lease, for workers on several hosts.

    Prefect takes cache locks with no expiry. Here each lock expires ``lease_seconds`` after it was last
    renewed, and a thread in the holding process renews it every third of that. A host that dies, or a run
    killed with SIGKILL, stops renewing: its lock is free within one lease, and the next run computes the stage.
    """

    def __init__(self, connection_url: str, lease_seconds: float = 60.0):
        super().__init__(connection_url=connection_url)
        self.lease_seconds = lease_seconds
        self._renewers: dict[str, threading.Event] = {}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "lease_seconds": self.lease_seconds}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._renewers = {}

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout or self.lease_seconds)
        if acquired and hold_timeout is None and key not in self._renewers:
            stop = self._renewers[key] = threading.Event()
            lock = self._locks[self._lock_name_for_key(key)]
            threading.Thread(target=self._renew, args=(lock, stop), name=f"lease-{key[:12]}", daemon=True).start()
        return acquired

    def release_lock(self, key: str, holder: str) -> None:
        stop = self._renewers.pop(key, None)
        if stop is not None:
            stop.set()
        super().release_lock(key, holder)

    def _renew(self, lock, stop: threading.Event) -> None:
        while not stop.wait(self.lease_seconds / 3):
            try:
                lock.reacquire()
            except LockError:  # released meanwhile, or the lease was lost: nothing left to renew
                return


def lock_manager() -> FileSystemLockManager | LeasedRedisLockManager:
    """``$OLIVEFLOW_LOCK_URL`` (redis://...) for workers on several hosts, else file locks in
    ``$OLIVEFLOW_LOCK_DIR`` (default ``$OLIVEFLOW_HOME/locks``), a folder every process on the host must share."""
    url = os.environ.get("OLIVEFLOW_LOCK_URL", "").strip()
    if url:
        return LeasedRedisLockManager(url, float(os.environ.get("OLIVEFLOW_LOCK_LEASE_SECONDS", "60")))
    return ProcessAwareLockManager(Path(os.environ.get("OLIVEFLOW_LOCK_DIR") or oliveflow_home() / "locks"))
