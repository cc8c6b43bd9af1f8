"""Fixtures for the reliability tests: real processes against real local stores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture
def busy_machine():
    """Bounded busy loops on every core (twice over), stopped by the test; each ends on its own after 10 min."""
    loop = "import time\nend = time.time() + 600\nwhile time.time() < end:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(2 * (os.cpu_count() or 1))]
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()
