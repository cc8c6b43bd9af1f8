import subprocess
import sys
import threading

from tasks.locking import HostLockManager

DIE_HOLDING = """
import os, sys
from pathlib import Path
from tasks.locking import HostLockManager
manager = HostLockManager(Path(sys.argv[1]))
manager.acquire_lock("stage-key", holder="dead-run")
print("held", flush=True)
sys.stdin.read()  # holds the lock until killed
"""


def test_lock_of_a_killed_process_is_freed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", DIE_HOLDING, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    manager = HostLockManager(tmp_path)
    assert manager.is_locked("stage-key")
    assert not manager.acquire_lock("stage-key", holder="next-run", acquire_timeout=0.5)
    holder.kill()  # SIGKILL: no release, no clean-up
    holder.wait(timeout=30)
    assert (tmp_path / "stage-key.lock").exists(), "the lock file stays; the OS lock went with the process"
    assert manager.acquire_lock("stage-key", holder="next-run", acquire_timeout=30)
    assert manager.is_lock_holder("stage-key", "next-run")
    assert not manager.is_lock_holder("stage-key", "dead-run")


def test_lock_of_a_live_holder_is_respected_across_managers_and_threads(tmp_path):
    holder = HostLockManager(tmp_path)
    assert holder.acquire_lock("k", holder="running")
    assert holder.acquire_lock("k", holder="running"), "re-entrant for its holder"
    other = HostLockManager(tmp_path)
    assert other.is_locked("k")
    assert not other.acquire_lock("k", holder="second", acquire_timeout=0.5)
    assert not other.wait_for_lock("k", timeout=0.2)
    # Another thread of the same process is excluded too (one descriptor per lock).
    got = []
    waiter = threading.Thread(target=lambda: got.append(other.acquire_lock("k", holder="second")))
    waiter.start()
    waiter.join(0.5)
    assert got == [] and waiter.is_alive()
    holder.release_lock("k", holder="running")
    waiter.join(30)
    assert got == [True] and other.is_lock_holder("k", "second")
    other.release_lock("k", holder="second")
    assert not other.is_locked("k")


def test_only_the_holder_may_release(tmp_path):
    import pickle

    import pytest

    manager = HostLockManager(tmp_path)
    assert manager.acquire_lock("k", holder="a")
    with pytest.raises(ValueError):
        manager.release_lock("k", holder="b")
    copy = pickle.loads(pickle.dumps(manager))  # Prefect may copy the cache policy; held locks stay here
    assert copy.lock_files_directory == manager.lock_files_directory and not copy.is_lock_holder("k", "a")
    manager.release_lock("k", holder="a")


# ---- leased Redis locks: workers on several hosts (a real redis-server) ----

HOLD_THEN_DIE = """
import os, sys, time
from tasks.locking import LeasedRedisLockManager
manager = LeasedRedisLockManager(sys.argv[1], lease_seconds=float(sys.argv[2]))
assert manager.acquire_lock("stage-key", holder="other-host-run")
print("held", flush=True)
time.sleep(float(sys.argv[3]))  # alive for this long: the lease is renewed meanwhile
os._exit(9)  # the host is lost mid-stage: no release
"""


def test_redis_lock_is_renewed_while_its_holder_lives_and_freed_when_it_dies(redis_server):
    from tasks.locking import LeasedRedisLockManager

    lease, alive = 1.5, 4.0
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THEN_DIE, redis_server.url, str(lease), str(alive)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    manager = LeasedRedisLockManager(redis_server.url, lease_seconds=lease)
    # Well past one lease, the living holder still has it: its renewals keep it.
    assert not manager.acquire_lock("stage-key", holder="next-run", acquire_timeout=alive - 1)
    assert manager.is_locked("stage-key")
    assert holder.wait(timeout=30) == 9
    # Dead: no renewals, and the lock is free within one lease of its last renewal.
    assert manager.acquire_lock("stage-key", holder="next-run", acquire_timeout=10)
    assert manager.is_lock_holder("stage-key", "next-run")
    manager.release_lock("stage-key", holder="next-run")
    assert not manager.is_locked("stage-key")


def test_lock_manager_is_chosen_by_environment(tmp_path, monkeypatch, redis_server):
    from tasks.locking import LeasedRedisLockManager, lock_manager

    monkeypatch.delenv("OLIVEFLOW_LOCK_URL", raising=False)
    monkeypatch.setenv("OLIVEFLOW_LOCK_DIR", str(tmp_path))
    files = lock_manager()
    assert isinstance(files, HostLockManager) and files.lock_files_directory == tmp_path.resolve()
    monkeypatch.setenv("OLIVEFLOW_LOCK_URL", redis_server.url)
    monkeypatch.setenv("OLIVEFLOW_LOCK_LEASE_SECONDS", "30")
    chosen = lock_manager()
    assert isinstance(chosen, LeasedRedisLockManager) and chosen.lease_seconds == 30
    assert chosen.acquire_lock("k", holder="a") and chosen.is_locked("k")
    chosen.release_lock("k", holder="a")
