"""MLflow tracking of one pipeline run: parameters, metrics, samples, configs, a chart, lineage, the model.

Plain functions, no Prefect import: the flow's tracking task calls ``track_run`` after the
stages. Tracking only reads the stage outputs, so a tracking server that is down fails
this step (with one line, after a few tries) and leaves the built artifacts in the store
and Prefect's cache for the next attempt.

Where runs go: ``$MLFLOW_TRACKING_URI`` when set (any server or store), otherwise the fixed
local store ``sqlite:///$OLIVEFLOW_HOME/mlflow/mlflow.db`` with artifacts under
``$OLIVEFLOW_HOME/mlflow/artifacts`` (never ``./mlruns`` of whatever folder a command ran in).

A local SQLite store is created once, under a file lock (``prepare_store``), by tracking and the
registry alike; a damaged one is a ``CorruptStoreError``, which no retry can fix. A server that does
not answer, or answers 5xx, is tried again with exponential backoff (``Backoff``), then one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field

from oliveflow.config import REPO_ROOT, oliveflow_home, template_fields
from oliveflow.errors import ServiceError, causes
from oliveflow.sft import split_template
from oliveflow.hashing import config_sha256, library_versions
from oliveflow.results import BaseModelRef, DataReport, PipelineResult

DEFAULT_EXPERIMENT = "oliveflow-pipeline"
MODEL_ARTIFACT = "model"
CHART_FILE = "charts/size_latency.png"
SAMPLES_FILE = "samples.json"
# MLflow's own defaults retry 7 times with a 120 s timeout: minutes before a down server is
# reported. These apply only while tracking, and only where the user has not set them.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
_PARAM_LIMIT = 6000  # characters MLflow keeps per parameter value
_BATCH = 100  # MLflow's per-request cap on params/tags
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


class Lineage(BaseModel):
    """Where a model came from: inputs' content hashes, code version, orchestrator run."""

    model_config = ConfigDict(frozen=True)

    data_sha256: str | None = Field(None, description="SHA-256 of the training JSONL file.")
    eval_data_sha256: str | None = Field(None, description="SHA-256 of the eval JSONL file.")
    base_model: str | None = Field(None, description="Base model spec as given (Hub id, folder, embedded).")
    base_model_sha256: str | None = Field(None, description="Content hash of the resolved base model folder.")
    git_commit: str | None = Field(None, description="HEAD of the code's git checkout; None outside one.")
    git_dirty: bool | None = Field(None, description="True when tracked files differ from HEAD.")
    flow_name: str | None = None
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    flow_run_url: str | None = None
    deployment_name: str | None = None

    def tags(self) -> dict[str, str]:
        """Non-empty fields as string tags (the same names in MLflow and the registries)."""
        return {k: str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in self.model_dump().items() if v is not None}


class TrackedRun(BaseModel):
    """Where one pipeline run was tracked."""

    model_config = ConfigDict(frozen=True)

    tracking_uri: str
    experiment_id: str
    experiment_name: str
    run_id: str
    run_url: str | None = Field(None, description="The run's page, when the tracking URI is a server.")
    model_uri: str | None = Field(None, description="URI of the logged pyfunc model (models:/<id>).")


# ---- where to track ----

def default_tracking_uri() -> str:
    return f"sqlite:///{oliveflow_home().resolve() / 'mlflow' / 'mlflow.db'}"


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else the fixed local SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


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


def public_uri(uri: str) -> str:
    """The URI without a user:password part (``http://user:pw@host`` must not reach logs or tags)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")))


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
            f"tracking: cannot open the MLflow store {db} ({type(exc).__name__}: {_one_line(exc)}); "
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
    return _damaged(db, f"is damaged ({_SQLITE_DAMAGED[code]}: {_one_line(cause)})")


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


# ---- lineage ----

def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _prefect_runtime() -> dict[str, str | None]:
    """The current Prefect flow run, if any; tracking also works outside Prefect."""
    try:
        from prefect.runtime import deployment, flow_run
    except ImportError:
        return {}
    return {"flow_name": flow_run.flow_name, "flow_run_id": flow_run.id, "flow_run_name": flow_run.name,
            "flow_run_url": flow_run.ui_url, "deployment_name": deployment.name}


def current_lineage(data: DataReport | None = None, base: BaseModelRef | None = None,
                    repo: Path = REPO_ROOT) -> Lineage:
    """Lineage of the running code: git HEAD of ``repo`` (None if not a checkout) and the Prefect run."""
    commit = _git(repo, "rev-parse", "HEAD")
    dirty = None if commit is None else bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
    runtime = {k: (str(v) if v else None) for k, v in _prefect_runtime().items()}
    return Lineage(data_sha256=data.train_sha256 if data else None,
                   eval_data_sha256=data.eval_sha256 if data else None,
                   base_model=base.spec if base else None, base_model_sha256=base.artifact.sha256 if base else None,
                   git_commit=commit, git_dirty=dirty, **runtime)


def experiment_name(lineage: Lineage, default: str = DEFAULT_EXPERIMENT) -> str:
    """One experiment per deployment, else per flow."""
    return lineage.deployment_name or lineage.flow_name or default


# ---- what gets logged ----

def flatten_params(params: BaseModel) -> dict[str, str]:
    """Dotted parameter names -> text. ``mode="json"`` renders any SecretStr as '**********'."""
    out: dict[str, str] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else str(key))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[prefix] = text[:_PARAM_LIMIT]

    walk(params.model_dump(mode="json"), "")
    return out


def run_metrics(result: PipelineResult) -> dict[str, float]:
    """Scalar metrics of a run (train loss per step is logged separately, with steps)."""
    smoke, adapter, quantized = result.smoke, result.adapter, result.quantized
    metrics: dict[str, float | None] = {
        "size.original_bytes": smoke.size_before_bytes,
        "size.onnx_bytes": smoke.size_after_bytes,
        "size.reduction": result.size_reduction,
        "size.quantized_checkpoint_bytes": quantized.size_after_bytes,
        "latency.load_seconds": smoke.load_seconds,
        "latency.ttft_ms.adapter": smoke.ttft_seconds * 1000,
        "latency.ttft_ms.base": smoke.ttft_seconds_base * 1000,
        "latency.decode_tokens_per_second.adapter": smoke.decode_tokens_per_second,
        "latency.decode_tokens_per_second.base": smoke.decode_tokens_per_second_base,
        "latency.token_p50_ms.adapter": smoke.token_latency_p50_ms,
        "latency.token_p90_ms.adapter": smoke.token_latency_p90_ms,
        "latency.token_p50_ms.base": smoke.token_latency_p50_ms_base,
        "latency.token_p90_ms.base": smoke.token_latency_p90_ms_base,
        "smoke.passed": float(smoke.passed),
        "eval_loss_original": adapter.eval_loss_original,
        "eval_loss_quantized": adapter.eval_loss_quantized,
        "eval_loss_finetuned": adapter.eval_loss_finetuned,
        "response_ppl_original": adapter.response_ppl_original,
        "response_ppl_quantized": adapter.response_ppl_quantized,
        "response_ppl_finetuned": adapter.response_ppl_finetuned,
        "rouge_l_base": smoke.rouge_l_base,
        "rouge_l_finetuned": smoke.rouge_l_finetuned,
        "finetune.truncated_examples": adapter.truncated_examples,
    }
    for name, run in result.stages.items():
        metrics[f"stage.{name}.seconds"] = run.seconds
        metrics[f"stage.{name}.cache_hit"] = float(run.cache == "hit")
        metrics[f"stage.{name}.output_bytes"] = run.output_bytes
    return {k: float(v) for k, v in metrics.items() if v is not None}


def run_tags(result: PipelineResult, lineage: Lineage) -> dict[str, str]:
    tags = {**lineage.tags(), "content_sha256": result.onnx.artifact.sha256,
            "smoke_passed": str(result.smoke.passed).lower()}
    tags.update({f"stage.{name}.cache": run.cache for name, run in result.stages.items()})
    if lineage.git_commit:
        tags["mlflow.source.git.commit"] = lineage.git_commit  # shown by the MLflow UI
    return tags


def olive_configs(result: PipelineResult) -> dict[str, Path]:
    """The Olive config each stage generated and saved beside its output."""
    stages = {"quantize": result.quantized.artifact.path, "finetune": result.adapter.artifact.path,
              "export": result.onnx.artifact.path}
    return {name: folder / "olive_config.json" for name, folder in stages.items()
            if (folder / "olive_config.json").is_file()}


def size_latency_chart(result: PipelineResult):
    """Size (original vs int4 ONNX) and latency (no adapter vs adapter) side by side.

    A bare ``Figure`` renders with Agg and never touches pyplot's global backend.
    """
    from matplotlib.figure import Figure

    smoke, adapter = result.smoke, result.adapter
    charts = [
        ("Model size (MB)", ["original", "int4 ONNX"],
         [smoke.size_before_bytes / 1e6, smoke.size_after_bytes / 1e6]),
        ("Time to first token (ms)", ["no adapter", "adapter"],
         [smoke.ttft_seconds_base * 1000, smoke.ttft_seconds * 1000]),
        ("Decode (tokens/s)", ["no adapter", "adapter"],
         [smoke.decode_tokens_per_second_base, smoke.decode_tokens_per_second]),
    ]
    ppl = [adapter.response_ppl_original, adapter.response_ppl_quantized, adapter.response_ppl_finetuned]
    if all(v is not None for v in ppl):
        charts.insert(1, ("Held-out response perplexity", ["original", "int4", "int4 + LoRA"], ppl))
    fig = Figure(figsize=(3.7 * len(charts), 3.6), layout="constrained")
    panels = fig.subplots(1, len(charts))
    for ax, (title, labels, values) in zip(panels, charts, strict=True):
        bars = ax.bar(labels, values, color=["#9aa5b1", "#c0c8d0", "#2f7ed8"][-len(values):])
        ax.bar_label(bars, fmt="%.3g")
        ax.margins(y=0.12)  # room for the labels above the bars
        ax.set_title(title)
    fig.suptitle(f"{result.base_model.spec}: {result.size_reduction:.2f}x smaller")
    return fig


def size_latency_png(result: PipelineResult) -> Path:
    """``size_latency_chart`` as a PNG, drawn once per content (``$OLIVEFLOW_HOME/charts``): a cache-hit re-run
    charts the same numbers, and drawing them costs ~1 s."""
    key = config_sha256(result.base_model.spec, result.size_reduction, result.smoke, result.adapter,
                        library_versions(("matplotlib",)))
    path = oliveflow_home() / "charts" / key[:16] / Path(CHART_FILE).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Drawn beside it, then renamed in: two runs drawing it at once each put a whole file there.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
        os.close(fd)
        try:
            size_latency_chart(result).savefig(tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


def samples_table(result: PipelineResult) -> dict[str, list[str]]:
    return {"prompt": [s.prompt for s in result.samples],
            "reference": [s.reference for s in result.samples],
            "base_answer": [s.base_answer for s in result.samples],
            "finetuned_answer": [s.finetuned_answer for s in result.samples]}


def prompt_template(template: str) -> tuple[str, str] | None:
    """(prompt part of the data template, its one field) for the pyfunc, when there is exactly one."""
    fields = template_fields(template)
    if len(fields) != 2:
        return None
    return split_template(template)[0], fields[0]


# ---- logging ----

@contextlib.contextmanager
def _http_limits(**forced: str) -> Iterator[None]:
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
    return _http_limits(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")


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


def _experiment_id(client, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = artifact_root(uri)
        location = (root / name.replace("/", "_")).as_uri() if root else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created concurrently by another run
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _log_batch(client, run_id: str, params: dict[str, str], tags: dict[str, str],
               metrics: dict[str, float], train_loss: list[float]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    param_items, tag_items = list(params.items()), list(tags.items())
    for i in range(0, max(len(param_items), len(tag_items)), _BATCH):
        client.log_batch(run_id, params=[Param(k, v) for k, v in param_items[i:i + _BATCH]],
                         tags=[RunTag(k, v) for k, v in tag_items[i:i + _BATCH]])
    entries = [Metric(k, v, now, 0) for k, v in metrics.items()]
    entries += [Metric("train_loss", float(loss), now, step) for step, loss in enumerate(train_loss)]
    for i in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[i:i + 1000])


def pyfunc_config(params: BaseModel, template: str | None = None) -> dict[str, Any]:
    """The pyfunc's model config: answer length and the chat template the adapter was trained on."""
    from oliveflow.mlflow_model import DEFAULT_MAX_NEW_TOKENS

    smoke_config = getattr(params, "smoke_test", None)
    config: dict[str, Any] = {"max_new_tokens": getattr(smoke_config, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)}
    split = prompt_template(template) if template else None
    if split:
        config["prompt_template"], config["prompt_field"] = split
    return config


def _logged_model_tags(result: PipelineResult, config: dict[str, Any]) -> dict[str, str]:
    return {"content_sha256": result.onnx.artifact.sha256, "pyfunc_config_sha256": config_sha256(config)}


def _reuse_logged_model(client, experiment_id: str, run_id: str, tags: dict[str, str]) -> str | None:
    """Link the same model, logged by an earlier run of this experiment, instead of copying it again.

    A cache-hit re-run would otherwise add another full copy of the model (GBs at real scale).
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    query = " AND ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    ready = [m for m in client.search_logged_models([experiment_id], filter_string=query, max_results=20)
             if m.status == LoggedModelStatus.READY]
    if not ready:
        return None
    client.log_outputs(run_id, [LoggedModelOutput(ready[0].model_id, 0)])
    return ready[0].model_uri


def _log_model(client, uri: str, experiment_id: str, run_id: str, result: PipelineResult,
               params: BaseModel) -> str:
    """The exported folder as a pyfunc model (models from code; see oliveflow.mlflow_model)."""
    from importlib import metadata

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from oliveflow import mlflow_model

    config = pyfunc_config(params, result.template)
    tags = _logged_model_tags(result, config)
    reused = _reuse_logged_model(client, experiment_id, run_id, tags)
    if reused:
        return reused
    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                               params=ParamSchema([ParamSpec("max_new_tokens", "long", config["max_new_tokens"])]))
    # Pinned requirements instead of MLflow's inference, which would load the model to find them.
    requirements = [f"{name}=={metadata.version(name)}" for name in ("mlflow", "onnxruntime-genai", "onnxruntime")]
    with using_tracking_uri(uri), mlflow.start_run(run_id=run_id, nested=False):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=str(Path(mlflow_model.__file__)),
            artifacts={"model_dir": str(result.onnx_model_dir)}, model_config=config, signature=signature,
            pip_requirements=[*requirements, "pandas"], tags=tags)
    return info.model_uri


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def track_run(result: PipelineResult, params: BaseModel, lineage: Lineage,
              experiment: str = DEFAULT_EXPERIMENT, log_model: bool = True, uri: str | None = None) -> TrackedRun:
    """Log one pipeline run to MLflow as one run of ``experiment``; return where it went.

    Raises TrackingError (one line) when the server is down or a write fails after retries, and
    CorruptStoreError when the local store is damaged (not retried: it needs a person).
    """
    uri = uri or tracking_uri()
    check_tracking(uri)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = None
    with _http_limits():
        try:
            experiment_id = _experiment_id(client, experiment, uri)
            run = client.create_run(experiment_id, run_name=lineage.flow_run_name)
            run_id = run.info.run_id
            _log_batch(client, run_id, flatten_params(params), run_tags(result, lineage), run_metrics(result),
                       result.adapter.train_loss)
            for stage, path in olive_configs(result).items():
                client.log_artifact(run_id, str(path), artifact_path=f"olive_configs/{stage}")
            client.log_text(run_id, result.model_dump_json(indent=1), "pipeline_result.json")
            client.log_table(run_id, samples_table(result), SAMPLES_FILE)
            client.log_artifact(run_id, str(size_latency_png(result)), artifact_path=str(Path(CHART_FILE).parent))
            model_uri = _log_model(client, uri, experiment_id, run_id, result, params) if log_model else None
            client.set_terminated(run_id, "FINISHED")
        except Exception as exc:
            _mark_failed(client, run_id)
            damage = store_damage(exc, sqlite_path(uri))
            if damage is not None:
                raise damage from exc
            raise TrackingError(f"tracking: logging to {public_uri(uri)} failed ({type(exc).__name__}: "
                                f"{_one_line(exc)}); the built model stays in the artifact store and cache, "
                                "re-run to track it") from exc
    return TrackedRun(tracking_uri=public_uri(uri), experiment_id=experiment_id, experiment_name=experiment,
                      run_id=run_id, run_url=run_url(uri, experiment_id, run_id), model_uri=model_uri)


def _mark_failed(client, run_id: str | None) -> None:
    if run_id is None:
        return
    with contextlib.suppress(Exception):  # the store may be what failed
        client.set_terminated(run_id, "FAILED")
