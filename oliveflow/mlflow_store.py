"""The MLflow store that tracking and the MLflow registry share: where it is, creating it once, its failures.

A local SQLite store is created once, under a file lock (``prepare_store``), by tracking and the
registry alike; a damaged one is a ``CorruptStoreError``, which no retry can fix. A server that does
not answer, or answers 5xx, is tried again with exponential backoff (``Backoff``), then one line.
MLflow itself is imported only inside the functions that use it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from oliveflow.config import oliveflow_home
from oliveflow.errors import ServiceError, causes
from oliveflow.lineage import default_tracking_uri, public_uri, tracking_uri

# MLflow's own defaults retry 7 times with a 120 s timeout: minutes before a down server is
# reported. These apply only while tracking, and only where the user has not set them.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# How long a process waits for another one's first-time creation of a local store (MLflow's migrations
# take ~6 s on 2 idle cores, far longer on a busy machine).
STORE_INIT_TIMEOUT = 600.0
_SQLITE_DAMAGED = {11: "SQLITE_CORRUPT", 26: "SQLITE_NOTADB"}  # primary result codes: the file itself is bad
_SQLITE_BUSY = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED: another process holds the database, worth another try


class TrackingError(ServiceError):
    """The tracking server or store could not take the run; a later try may succeed (the flow retries once)."""


class CorruptStoreError(ServiceError):
    """A local MLflow store is damaged or is not an MLflow database: no retry can fix it, a person must."""


@dataclass(frozen=True)
class Backoff:
    """Retries of a transient failure: ``attempts`` tries in all, waiting ``first`` seconds after the first
    failure and twice as long after each next one, at most ``cap`` seconds."""

    attempts: int = 3
    first: float = 1.0
    cap: float = 10.0

    def waits(self) -> list[float]:
        return [min(self.cap, self.first * 2**i) for i in range(max(self.attempts, 1) - 1)]

    @classmethod
    def for_mlflow(cls) -> Backoff:
        """MLflow's own knobs, so one setting governs every MLflow retry: 1 + ``$MLFLOW_HTTP_REQUEST_MAX_RETRIES``
        tries, waiting ``$MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` s first (defaults: HTTP_LIMITS, 3 tries, 1 s + 2 s)."""
        def setting(name: str) -> str:
            return os.environ.get(name) or HTTP_LIMITS[name]

        try:
            return cls(attempts=1 + int(setting("MLFLOW_HTTP_REQUEST_MAX_RETRIES")),
                       first=float(setting("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")))
        except ValueError:
            return cls()


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s message on one line, cut to ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- where to track ----

def preload_mlflow() -> None:
    """Import what ``track_run`` uses (MLflow and its SQL store: ~2 s) ahead of it: a local run does this while
    its Prefect server starts, instead of after the stages."""
    import mlflow  # noqa: F401

    if sqlite_path(tracking_uri()) is not None:
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def artifact_root(uri: str) -> Path | None:
    """Where a local store keeps artifacts: beside its database. None: the server decides."""
    if uri == default_tracking_uri():
        return oliveflow_home().resolve() / "mlflow" / "artifacts"
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts"
    return None


def _is_server(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    return f"{public_uri(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if _is_server(uri) else None


def check_tracking(uri: str, attempts: int | None = None, timeout: float = 5.0, backoff: float | None = None) -> None:
    """Fail fast, in one line, when the tracking server does not answer (or the local store can't be made).

    A server is asked ``attempts`` times with exponential backoff (default ``Backoff.for_mlflow()``); a
    local SQLite store is created here if new (``prepare_store``).
    """
    if sqlite_path(uri) is not None:
        prepare_store(uri)
        return
    if not _is_server(uri):
        return
    import requests

    policy = Backoff.for_mlflow()
    attempts = attempts or policy.attempts
    waits = Backoff(attempts, policy.first if backoff is None else backoff).waits()
    problem = ""
    for attempt in range(attempts):
        try:
            response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
            if response.ok:
                return
            problem = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            problem = type(exc).__name__
        if attempt + 1 < attempts:
            time.sleep(waits[attempt])
    raise TrackingError(f"tracking: MLflow server {public_uri(uri)} did not answer after {attempts} tries ({problem}); "
                        "start it, or unset MLFLOW_TRACKING_URI to track in the local store "
                        f"({default_tracking_uri()})")


# ---- the local store ----

_PREPARED: set[Path] = set()  # stores this process has opened (MLflow keeps them open per URI)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path).resolve()


def prepare_store(uri: str) -> None:
    """Create or open a local SQLite MLflow store, one process at a time; other URIs: nothing to do.

    MLflow creates and migrates a new database the first time a client opens it, without a lock:
    four runs started together each ran the migrations and three failed ("duplicate column name:
    step", "table ... already exists", alembic's "expected to match one row"). Here the first open
    happens under a file lock beside the database, so the others find it migrated. Tracking and the
    MLflow registry both call this before their first use of the store; once per process.
    """
    db = sqlite_path(uri)
    if db is None or db in _PREPARED:
        return
    from filelock import FileLock, Timeout
    from mlflow import MlflowClient

    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingError(f"tracking: cannot create the MLflow store folder {db.parent} ({exc}); "
                            "set OLIVEFLOW_HOME or MLFLOW_TRACKING_URI to a writable place") from exc
    lock = FileLock(f"{db}.init.lock", timeout=STORE_INIT_TIMEOUT)
    try:
        with lock:
            _check_is_mlflow_store(db)
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_experiments(max_results=1)  # opening each store creates and migrates the tables
            client.search_registered_models(max_results=1)
    except Timeout:
        raise TrackingError(f"tracking: another process has been creating the MLflow store {db} for over "
                            f"{STORE_INIT_TIMEOUT:.0f} s (lock {lock.lock_file}); let it finish or stop it, "
                            "then re-run") from None
    except CorruptStoreError:
        raise
    except Exception as exc:
        raise store_damage(exc, db) or TrackingError(
            f"tracking: cannot open the MLflow store {db} ({type(exc).__name__}: {one_line(exc)}); "
            "re-run, or set MLFLOW_TRACKING_URI to another store") from exc
    _PREPARED.add(db)


def _damaged(db: Path, problem: str) -> CorruptStoreError:
    return CorruptStoreError(f"MLflow store {db} {problem}; move it aside (mv {db} {db}.damaged) for a fresh "
                             "store, or set MLFLOW_TRACKING_URI to another one")


def _check_is_mlflow_store(db: Path) -> None:
    """Refuse, before MLflow adds its tables to it, a file that is not a (new or existing) MLflow store."""
    import sqlite3

    if not db.is_file() or db.stat().st_size == 0:
        return  # new: MLflow creates it
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
            tables = sorted(name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
            columns = {row[1] for row in con.execute("PRAGMA table_info(experiments)")}
    except sqlite3.DatabaseError as exc:
        damage = store_damage(exc, db)
        if damage is None:
            raise
        raise damage from exc
    if tables and "experiment_id" not in columns:
        raise _damaged(db, f"is an SQLite database but not an MLflow store (tables: {', '.join(tables[:6])})")


def _sqlite_code(exc: BaseException) -> int | None:
    import sqlite3

    found = [e for e in causes(exc) if isinstance(e, sqlite3.Error)]
    code = getattr(found[0], "sqlite_errorcode", None) if found else None
    return None if code is None else code & 0xFF


def store_damage(exc: BaseException, db: Path | None) -> CorruptStoreError | None:
    """The one-line error for ``exc`` when it says a local store's file is damaged (SQLite's own verdict)."""
    code = _sqlite_code(exc)
    if db is None or code not in _SQLITE_DAMAGED:
        return None
    import sqlite3

    cause = next(e for e in causes(exc) if isinstance(e, sqlite3.Error))
    return _damaged(db, f"is damaged ({_SQLITE_DAMAGED[code]}: {one_line(cause)})")


def transient(exc: BaseException, uri: str) -> bool:
    """Worth another try: a server that did not answer or answered 429/5xx, or a local store busy elsewhere."""
    if sqlite_path(uri) is not None:
        return _sqlite_code(exc) in _SQLITE_BUSY
    if not _is_server(uri):
        return False
    import requests
    from mlflow.exceptions import MlflowException

    for cause in causes(exc):
        if isinstance(cause, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)):
            return True
        if isinstance(cause, MlflowException) and (cause.get_http_status_code() >= 500
                                                   or cause.get_http_status_code() == 429):
            return True
    return False


# ---- MLflow's HTTP settings and global URI ----

@contextlib.contextmanager
def http_limits(**forced: str) -> Iterator[None]:
    """HTTP_LIMITS where the user has not set them, and ``forced`` values whatever was set, for a block."""
    saved = {k: os.environ.get(k) for k in forced}
    added = {k: v for k, v in HTTP_LIMITS.items() if k not in os.environ and k not in forced}
    os.environ.update(added)
    os.environ.update(forced)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def single_requests() -> contextlib.AbstractContextManager[None]:
    """MLflow's own HTTP retries off for a block, whose caller retries instead.

    MLflow retries every method, POST included, after a dropped connection: a model version
    created by a request whose answer was lost would be created again.
    """
    return http_limits(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Make ``uri`` MLflow's global tracking URI for a block, then put the previous one back.

    Some MLflow calls only know the global URI (``log_model``; ``create_model_version``
    resolving a ``models:/m-...`` source): without this they would open ./mlflow.db.

    MLflow's own restore also unsets ``$MLFLOW_TRACKING_URI`` when no URI was set in code,
    so the variable is put back here too.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if previous is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous
