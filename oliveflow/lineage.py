"""Where runs are tracked and where a model came from: shared by tracking and the registry, no SDK imports.

``tracking_uri`` is ``$MLFLOW_TRACKING_URI`` when set (any server or store), otherwise the fixed local store
``sqlite:///$OLIVEFLOW_HOME/mlflow/mlflow.db``. ``Lineage`` holds the inputs' content hashes, the code version
and the orchestrator's run; the run is passed in as plain values (``RunContext``): nothing under ``oliveflow/``
imports Prefect.
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field

from oliveflow.config import REPO_ROOT, oliveflow_home
from oliveflow.results import BaseModelRef, DataReport
from oliveflow.settings import current

CONTENT_TAG = "content_sha256"  # the exported folder's content hash: a tag of the run, the logged model, the version


@dataclass(frozen=True)
class RunContext:
    """The orchestrator run a model is built in, as plain values (the flow reads them from ``prefect.runtime``)."""

    flow_name: str | None = None
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    flow_run_url: str | None = None
    deployment_name: str | None = None


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
    return current().mlflow_tracking_uri or default_tracking_uri()


def public_uri(uri: str) -> str:
    """The URI without a user:password part (``http://user:pw@host`` must not reach logs or tags)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")))


# ---- lineage ----

def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def current_lineage(data: DataReport | None = None, base: BaseModelRef | None = None, run: RunContext | None = None,
                    repo: Path = REPO_ROOT) -> Lineage:
    """Lineage of the running code: git HEAD of ``repo`` (None if not a checkout) and the orchestrator ``run``
    (None outside one: tracking also works outside Prefect)."""
    commit = _git(repo, "rev-parse", "HEAD")
    dirty = None if commit is None else bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
    runtime = {k: (str(v) if v else None) for k, v in asdict(run or RunContext()).items()}
    return Lineage(data_sha256=data.train_sha256 if data else None,
                   eval_data_sha256=data.eval_sha256 if data else None,
                   base_model=base.spec if base else None, base_model_sha256=base.artifact.sha256 if base else None,
                   git_commit=commit, git_dirty=dirty, **runtime)
