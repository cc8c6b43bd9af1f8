import subprocess
import sys
import time

from tasks.locking import ProcessAwareLockManager

DIE_HOLDING = """
import os, sys
from pathlib import Path
from tasks.locking import ProcessAwareLockManager
ProcessAwareLockManager(Path(sys.argv[1])).acquire_lock("stage-key", holder="dead-run")
os._exit(9)  # killed mid-stage: no release
"""


def test_lock_of_a_dead_process_is_freed(tmp_path):
    done = subprocess.run([sys.executable, "-c", DIE_HOLDING, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 9, done.stderr
    assert (tmp_path / "stage-key.lock").exists(), "the dead run left its lock behind"
    manager = ProcessAwareLockManager(tmp_path)
    started = time.monotonic()
    assert manager.acquire_lock("stage-key", holder="next-run", acquire_timeout=5)
    assert time.monotonic() - started < 2
    assert manager.is_lock_holder("stage-key", "next-run")


def test_lock_of_a_live_process_is_respected(tmp_path):
    holder = ProcessAwareLockManager(tmp_path)
    assert holder.acquire_lock("k", holder="running")
    other = ProcessAwareLockManager(tmp_path)
    assert not other.acquire_lock("k", holder="second", acquire_timeout=0.5)
    holder.release_lock("k", holder="running")
    assert other.acquire_lock("k", holder="second", acquire_timeout=1)


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
    started = time.monotonic()
    manager = LeasedRedisLockManager(redis_server.url, lease_seconds=lease)
    # Well past one lease, the living holder still has it: its renewals keep it.
    assert not manager.acquire_lock("stage-key", holder="next-run", acquire_timeout=alive - 1)
    assert manager.is_locked("stage-key")
    assert holder.wait(timeout=30) == 9
    # Dead: no renewals, and the lock is free within one lease of its last renewal.
    assert manager.acquire_lock("stage-key", holder="next-run", acquire_timeout=10)
    assert lease * 2 < time.monotonic() - started < alive + 2 * lease
    assert manager.is_lock_holder("stage-key", "next-run")
    manager.release_lock("stage-key", holder="next-run")
    assert not manager.is_locked("stage-key")


def test_lock_manager_is_chosen_by_environment(tmp_path, monkeypatch, redis_server):
    from tasks.locking import LeasedRedisLockManager, lock_manager

    monkeypatch.delenv("OLIVEFLOW_LOCK_URL", raising=False)
    monkeypatch.setenv("OLIVEFLOW_LOCK_DIR", str(tmp_path))
    files = lock_manager()
    assert isinstance(files, ProcessAwareLockManager) and files.lock_files_directory == tmp_path.resolve()
    monkeypatch.setenv("OLIVEFLOW_LOCK_URL", redis_server.url)
    monkeypatch.setenv("OLIVEFLOW_LOCK_LEASE_SECONDS", "30")
    chosen = lock_manager()
    assert isinstance(chosen, LeasedRedisLockManager) and chosen.lease_seconds == 30
    assert chosen.acquire_lock("k", holder="a") and chosen.is_locked("k")
    chosen.release_lock("k", holder="a")
