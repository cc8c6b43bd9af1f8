"""The temporary Prefect API server of a local run, started in the background before Prefect is imported.

Prefect's own (``prefect.server.api.server.SubprocessASGIServer``) costs ~3 s of imports in the parent before its
process even starts, then the parent idles ~4 s until it answers. This starts the same uvicorn command at once;
the parent imports and checks meanwhile and waits for ``/api/health`` only when the flow needs the API. Nothing
here imports Prefect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from filelock import FileLock

# In the message of the start-up failure: run_local retries once on it.
STARTUP_FAILURE = "ephemeral Prefect API server"
# What Prefect's SubprocessASGIServer adds to the environment of its server (no UI, ephemeral mode).
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
# Unless the user set them: no block types registered at start-up. A local run uses no blocks, and checking whether
# they are registered imports every installed collection (prefect_azure...): ~1 s of the server's ~4 s start.
_SERVER_DEFAULTS = {"PREFECT_API_BLOCKS_REGISTER_ON_START": "false", "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false"}

logger = logging.getLogger("prefect")


@dataclass
class TemporaryServer:
    process: subprocess.Popen
    port: int
    started: float  # time.monotonic() at spawn: the start-up budget counts from here
    lock: FileLock  # held from spawn until it answers: the first server of a fresh home creates its database

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


def start_server(settings_env: dict[str, str] | None = None) -> TemporaryServer:
    """Spawn a temporary server, one start at a time per $PREFECT_HOME (a second server started while the first
    created a fresh home's database migrated the half-made tables too: ``NoSuchTableError``, ``table ... already
    exists``); the lock is held until ``wait_healthy``.

    ``settings_env``: the parent's Prefect settings as variables, as Prefect passes them; a fresh process has none
    beyond what the server reads itself from the same environment and profile.
    """
    env = {**_SERVER_DEFAULTS, **os.environ, **_SERVER_ENV, **(settings_env or {})}
    home = Path(env.get("PREFECT_HOME") or "~/.prefect").expanduser()  # Prefect's default home
    home.mkdir(parents=True, exist_ok=True)
    lock = FileLock(home / ".oliveflow-server-start.lock")
    lock.acquire()
    try:
        port = _free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(find_spec("prefect").origin).parent.parent),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env=env)
    except BaseException:
        lock.release()
        raise
    return TemporaryServer(process, port, time.monotonic(), lock)


def _free_port() -> int:
    """A port in Prefect's range that is free now (as Prefect picks its temporary server's)."""
    for _ in range(10):
        port = random.randrange(8000, 9000)
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                time.sleep(random.uniform(0.1, 0.5))
    raise RuntimeError(f"{STARTUP_FAILURE}: no free port in 8000-8999")


def wait_healthy(server: TemporaryServer, budget: float) -> None:
    """Return once the server answers /api/health; raise RuntimeError naming STARTUP_FAILURE if it has not within
    ``budget`` seconds of its spawn (a budget of 0 is never met), or it exited."""
    import httpx

    deadline = server.started + budget
    try:
        with httpx.Client() as client:
            while budget > 0 and server.process.poll() is None:
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{server.api_url}/health").status_code == 200:
                        logger.info("Temporary server on http://127.0.0.1:%d", server.port)
                        return
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
    finally:
        server.lock.release()
    exited = server.process.poll()
    raise RuntimeError(f"Timed out while attempting to connect to {STARTUP_FAILURE}"
                       + (f" (it exited with code {exited})" if exited is not None else ""))


def stop_server(server: TemporaryServer) -> None:
    """Terminate it (kill if it does not stop within 5 s) and reap it; safe to call twice."""
    if server.process.poll() is None:
        logger.info("Stopping temporary server on http://127.0.0.1:%d", server.port)
        server.process.terminate()
        try:
            server.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    server.lock.release(force=True)
