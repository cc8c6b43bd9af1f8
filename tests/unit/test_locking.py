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
