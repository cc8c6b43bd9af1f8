"""Start-up on a busy machine, and entry points whose services are down: real processes, no mocks.

Part of the reliability issue: only the start-up items are here so far.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from runs import OLIVEFLOW, QUICK, REPO, run_env as _env


def _temporary_servers(prefect_home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "prefect.server.api.server:create_app" in " ".join(proc.info["cmdline"] or []) and \
                    proc.environ().get("PREFECT_HOME") == str(prefect_home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_a_server_that_cannot_start_is_one_line_and_leaves_nothing(tiny_model_dir, tmp_path):
    # A budget of 0 s cannot be met: both attempts fail, which is what a machine too busy to start it looks like.
    done = subprocess.run([*OLIVEFLOW, "run", "--model", str(tiny_model_dir), *QUICK], cwd=REPO, text=True,
                          capture_output=True, timeout=600,
                          env=_env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0"))
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("oliveflow: error: Prefect's temporary API server did not start within 0 s, twice")
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in last and "PREFECT_API_URL" in last
    assert "Traceback" not in done.stderr
    time.sleep(1)
    assert not _temporary_servers(tmp_path / "prefect"), "the half-started servers are stopped"


def test_deploy_against_a_server_that_is_down_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "deployments.deploy", "--train-data",
                           str(REPO / "data" / "travel_train.jsonl")], cwd=REPO, text=True, capture_output=True,
                          timeout=300, env=_env(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr[-2000:]
    assert "cannot reach the Prefect server at http://127.0.0.1:9/api" in done.stderr


@pytest.mark.slow
def test_a_cold_run_succeeds_on_a_busy_machine(busy_machine, tiny_model_dir, tmp_path):
    """A fresh $PREFECT_HOME (its database is created at start-up) while every core is taken."""
    assert all(p.poll() is None for p in busy_machine)
    done = subprocess.run([*OLIVEFLOW, "run", "--model", str(tiny_model_dir), "--json", *QUICK], cwd=REPO,
                          text=True, capture_output=True, timeout=1200, env=_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(p.poll() is None for p in busy_machine), "the load lasted the whole run"
    assert '"onnx_model_dir"' in done.stdout.strip().splitlines()[-1]
