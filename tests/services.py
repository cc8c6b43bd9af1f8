"""Real services the tests start and stop by pid: Azurite (blob storage) and a Redis server.

Both are installed outside pip (.ci/install-azurite.sh, .ci/install-redis.sh). ``require`` turns a
missing one (or any other tool a test needs) into a skip that says how to install it, and into a failure
under CI for what .ci/run says CI must have (Azurite; Chromium and Playwright for the UI test).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, documented by Microsoft); not a secret.
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
STORAGE_SUFFIX = "core.localhost"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(found: T | None, reason: str, ci_must_have: bool) -> T:
    """``found`` (a binary's path, an imported module...), or a skip saying ``reason`` when it is None; under CI
    (``CI`` set, as .ci/run sets it) a failure instead when ``ci_must_have``."""
    if found is not None:
        return found
    if ci_must_have and os.environ.get("CI"):
        pytest.fail(reason + " -- CI must run these tests, not skip them")
    pytest.skip(reason)


def running(service: _Service):
    """Yield the started service; afterwards check it is gone, not orphaned (for session fixtures)."""
    with service:
        yield service
    with pytest.raises(ProcessLookupError):
        os.kill(service.pid, 0)


def azurite_binary() -> Path | None:
    """azurite-blob from $OLIVEFLOW_AZURITE_DIR (what .ci/install-azurite.sh fills) or PATH."""
    prefix = Path(os.environ.get("OLIVEFLOW_AZURITE_DIR", Path.home() / ".cache" / "oliveflow-azurite"))
    candidate = prefix / "node_modules" / ".bin" / "azurite-blob"
    if candidate.is_file():
        return candidate
    found = shutil.which("azurite-blob")
    return Path(found) if found else None


def redis_binary() -> Path | None:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file()
                                             else None)
    return Path(found) if found else None


class _Service:
    """A child process listening on a free port, started on enter and stopped by pid on exit."""

    name = "service"

    def __init__(self, workdir: Path):
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / f"{self.name}.log"
        self._command: list[str] = []
        self._process: subprocess.Popen | None = None

    def __enter__(self):
        with open(self.log, "wb") as log:
            self._process = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._process.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return self
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"{self.name} did not listen on {self.port} within 30 s: {self.log.read_text()[-2000:]}")

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def __exit__(self, *exc) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)


class Azurite(_Service):
    """Azurite's blob service on a free port: over TLS when given a certificate pair, else plain http."""

    name = "azurite"

    def __init__(self, binary: Path, workdir: Path, tls=None):
        super().__init__(workdir)
        self.data_dir = workdir / "data"
        self._command = [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                         "--location", str(self.data_dir), "--skipApiVersionCheck", "--loose", "--silent"]
        if tls is not None:
            self._command += ["--cert", str(tls.cert), "--key", str(tls.key)]
            self.account_url = f"https://{ACCOUNT}.blob.{STORAGE_SUFFIX}:{self.port}"
        else:
            self.account_url = f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
                f"BlobEndpoint={self.account_url};")


class Redis(_Service):
    """redis-server on a free port, no persistence."""

    name = "redis"

    def __init__(self, binary: Path, workdir: Path):
        super().__init__(workdir)
        self._command = [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--dir", str(workdir)]
        self.url = f"redis://127.0.0.1:{self.port}/0"
