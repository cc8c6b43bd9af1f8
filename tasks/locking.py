"""Cache locks for the stage tasks: file locks on one host, leased Redis locks across hosts.

Both are safe against runs that die while holding a lock."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio.to_thread
from filelock import FileLock, Timeout
from prefect_redis.locking import RedisLockManager
from redis.exceptions import LockError

from oliveflow.settings import Settings, current
from oliveflow.store import lock_is_held


class HostLockManager:
    """Cache locks for the processes of one host: one OS file lock (``flock``) per cache key.

    Prefect's own FileSystemLockManager writes a JSON lock file in two steps, so a process that reads it
    meanwhile fails (``EOF while parsing``), and a run killed mid-stage leaves it held forever. An OS lock is
    taken atomically and is released by the kernel when its process dies, however it dies (SIGKILL, the OOM
    killer): the next run that needs the stage computes it. Lock files stay behind, empty and unlocked.
    """

    def __init__(self, lock_files_directory: Path) -> None:
        self.lock_files_directory = Path(lock_files_directory).expanduser().resolve()
        self._held: dict[str, tuple[str, FileLock]] = {}

    def __getstate__(self) -> dict:
        return {"lock_files_directory": self.lock_files_directory}  # held locks never travel

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["lock_files_directory"])

    def _file_lock(self, key: str) -> FileLock:
        self.lock_files_directory.mkdir(parents=True, exist_ok=True)
        # A new descriptor per FileLock: two threads of one process exclude each other too.
        return FileLock(self.lock_files_directory / f"{key}.lock", thread_local=False)

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        # hold_timeout is not needed: the lock ends with its process.
        if self.is_lock_holder(key, holder):
            return True
        lock = self._file_lock(key)
        try:
            lock.acquire(timeout=-1 if acquire_timeout is None else acquire_timeout)
        except Timeout:
            return False
        self._held[key] = (holder, lock)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        if not self.is_lock_holder(key, holder):
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")
        self._held.pop(key)[1].release()

    def is_locked(self, key: str) -> bool:
        return key in self._held or lock_is_held(Path(self._file_lock(key).lock_file))

    def is_lock_holder(self, key: str, holder: str) -> bool:
        held = self._held.get(key)
        return held is not None and held[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        probe = self._file_lock(key)
        try:
            probe.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            return False
        probe.release()
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)


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


LockManager = HostLockManager | LeasedRedisLockManager


def lock_manager(settings: Settings | None = None) -> LockManager:
    """``lock_url`` (``$OLIVEFLOW_LOCK_URL``, redis://...) for workers on several hosts, else file locks in
    ``lock_dir`` (``$OLIVEFLOW_LOCK_DIR``, default ``$OLIVEFLOW_HOME/locks``), a folder every process on the host
    must share. ``settings``: the current ones by default."""
    settings = settings or current()
    if settings.lock_url:
        return LeasedRedisLockManager(settings.lock_url, settings.lock_lease_seconds)
    return HostLockManager(settings.locks_folder())
