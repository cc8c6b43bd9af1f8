"""The temporary Prefect server of a local run (flows/server.py): a real process, no mocks."""

from __future__ import annotations

import httpx
import pytest

from flows.server import STARTUP_FAILURE, start_server, stop_server, wait_healthy


def test_a_server_answers_then_stops(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # a fresh home: it creates its database
    server = start_server()
    try:
        wait_healthy(server, 300)
        assert httpx.get(f"{server.api_url}/health").status_code == 200
        assert not server.lock.is_locked, "the next start need not wait once it answers"
    finally:
        stop_server(server)
    assert server.process.poll() is not None
    stop_server(server)  # twice: nothing left to do


def test_a_budget_of_zero_is_never_met_and_names_the_failure(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    server = start_server()
    try:
        with pytest.raises(RuntimeError, match=STARTUP_FAILURE):
            wait_healthy(server, 0)
    finally:
        stop_server(server)
    assert server.process.poll() is not None and not server.lock.is_locked
