"""Registry backends behind one small interface: the MLflow Model Registry (local default) or Azure ML.

Backends implement single tries of find / latest / get / create; ``ModelRegistry.retrying`` and
``create_once`` retry them. A registry that does not answer, or answers 5xx (blob storage timing out
included), is tried again with exponential backoff, then the error is one line. A retried registration
first looks the content hash up: a try whose answer was lost may have made the version, and a second
one is never made.

Clients are built by the factories here (``azure_ml_client``, ``azure_credential``) or in
``oliveflow.registry.make_registry``, never inside stage code; tests hand the registries their own
clients. Secrets live in ``SecretStr`` fields and are only unwrapped when a credential object is built.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from oliveflow.config import AzurePrincipal, AzureWorkspace, RegistryConfig, find_workspace_config, \
    registry_settings_errors
from oliveflow.errors import InputError, ServiceError, causes
from oliveflow.lineage import CONTENT_TAG, public_uri
from oliveflow.mlflow_store import (
    STORE_INIT_TIMEOUT, Backoff, one_line, prepare_store, single_requests, sqlite_path, store_damage, transient,
    using_tracking_uri,
)

PUBLIC_AUTHORITIES = {"login.microsoftonline.com", "login.chinacloudapi.cn", "login.microsoftonline.us"}
# azure-core's own retries of one ARM request (defaults: 10 retries, up to 120 s apart: many minutes before
# an outage is reported). Bounded here unless the caller passes its own; the registry retries on top.
AZURE_HTTP_LIMITS = {"retry_total": 2, "retry_backoff_factor": 0.5, "retry_backoff_max": 8}
_log = logging.getLogger(__name__)
_T = TypeVar("_T")


class RegistryError(ServiceError):
    """The registry refused or could not take the model; the message says what to do."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---- the interface ----

class RegisteredVersion(_Frozen):
    name: str
    version: str
    content_hash: str | None
    tags: dict[str, str] = Field(default_factory=dict, description="Lineage and key metrics (eval_loss_...).")
    uri: str = Field(description="How to refer to this version (models:/name/1, azureml:name:1).")

    def metric(self, key: str) -> float | None:
        try:
            value = float(self.tags[key])
        except (KeyError, ValueError):
            return None
        return value if math.isfinite(value) else None

    def unreadable(self, *keys: str) -> dict[str, str]:
        """Metric tags present but not a finite number: edited by hand or damaged, not merely missing."""
        return {k: self.tags[k] for k in keys if k in self.tags and self.metric(k) is None}


class ModelRegistry(ABC):
    """A model registry: find by content, the latest version, make a version of a folder.

    Backends implement single tries of each call; ``retrying`` and ``create_once`` retry them.
    """

    backend: ClassVar[str]
    backoff: Backoff  # set by each backend's __init__
    unavailable_fix: ClassVar[str] = "re-run when the registry answers again"

    def _transient(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the service was briefly unavailable (no answer, 429, 5xx): worth another try."""
        return False

    def _damage(self, exc: BaseException) -> Exception | None:
        """The error to raise instead of ``exc`` when it says the registry's own store is damaged."""
        return None

    def _single_requests(self) -> contextlib.AbstractContextManager[None]:
        """A block in which the client's own retries, if unsafe for creates, are off."""
        return contextlib.nullcontext()

    def exclusive(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Held from looking up ``name`` to creating its version, where the backend can (a local store)."""
        return contextlib.nullcontext()

    def retrying(self, what: str, call: Callable[[], _T]) -> _T:
        """``call()``, tried again after a transient failure with ``self.backoff``, then one line."""
        waits = self.backoff.waits()
        for attempt in range(1, len(waits) + 2):
            try:
                with self._single_requests():
                    return call()
            except RegistryError:
                raise
            except Exception as exc:
                damage = self._damage(exc)
                if damage is not None:
                    raise damage from exc
                if not self._transient(exc):
                    raise
                if attempt > len(waits):
                    raise RegistryError(f"registry {self.backend}: {what} failed {attempt} times, the last with "
                                        f"{type(exc).__name__}: {one_line(exc)}; {self.unavailable_fix}") from exc
                _log.warning("registry %s: %s failed (%s: %s); try %d of %d in %.1f s", self.backend, what,
                             type(exc).__name__, one_line(exc, 200), attempt + 1, len(waits) + 1, waits[attempt - 1])
                time.sleep(waits[attempt - 1])
        raise AssertionError("unreachable")

    def create_once(self, name: str, model_dir: Path, content_hash: str, tags: dict[str, str], version: str | None,
                    model_uri: str | None) -> RegisteredVersion:
        """``create_version``, retried after transient failures without ever making a second version.

        A try can make the version and then lose its answer (a dropped connection, a 5xx from a
        proxy, a timeout): each retry first looks the content hash up and returns what it finds.
        """
        tries = 0

        def attempt() -> RegisteredVersion:
            nonlocal tries
            tries += 1
            if tries > 1:
                found = self.find(name, content_hash)
                if found is not None:
                    _log.info("registry %s: the failed try registered %s v%s; not made again", self.backend, name,
                              found.version)
                    return found
            return self.create_version(name, Path(model_dir), content_hash, {**tags, CONTENT_TAG: content_hash},
                                       version, model_uri)

        return self.retrying(f"registering {name}", attempt)

    @abstractmethod
    def find(self, name: str, content_hash: str) -> RegisteredVersion | None:
        """The version of ``name`` whose content hash tag is ``content_hash``, if any."""

    @abstractmethod
    def latest(self, name: str) -> RegisteredVersion | None:
        """The most recently registered version of ``name`` (the champion), if any."""

    @abstractmethod
    def get(self, name: str, version: str) -> RegisteredVersion | None:
        """One version, if it exists."""

    @abstractmethod
    def create_version(self, name: str, model_dir: Path, content_hash: str, tags: dict[str, str], version: str | None,
                model_uri: str | None) -> RegisteredVersion:
        """Make a new version, no questions asked: ``register_model`` rules out duplicates first."""

    def existing(self, name: str, content_hash: str, version: str | None = None) -> RegisteredVersion | None:
        """The version already holding this content, if any; an error if ``version`` holds other content."""
        found = self.retrying(f"looking up {name}", lambda: self.find(name, content_hash))
        if found is not None or version is None:
            return found
        taken = self.retrying(f"reading {name} version {version}", lambda: self.get(name, version))
        if taken is not None:
            raise RegistryError(
                f"registry {self.backend}: {name} version {version} already holds another model "
                f"({CONTENT_TAG} {str(taken.content_hash)[:12]}…, this one {content_hash[:12]}…); "
                "leave the version empty for the next number or pick an unused one")
        return None


# ---- MLflow Model Registry ----

class MlflowRegistry(ModelRegistry):
    """The MLflow Model Registry of a tracking store; versions point at the run's logged pyfunc model."""

    backend = "mlflow"

    def __init__(self, uri: str, client=None, backoff: Backoff | None = None):
        from mlflow import MlflowClient

        prepare_store(uri)  # a new local store is created here, under its lock; a damaged one fails here
        self.uri = uri  # tracking and registry store: the one the run and its model were logged to
        self._client = client or MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.backoff = backoff or Backoff.for_mlflow()
        self.unavailable_fix = (f"check that the MLflow server {public_uri(uri)} is up, then re-run (the same "
                                "model is never registered twice)")

    def _transient(self, exc: BaseException) -> bool:
        return transient(exc, self.uri)

    def _damage(self, exc: BaseException) -> Exception | None:
        return store_damage(exc, sqlite_path(self.uri))

    def _single_requests(self) -> contextlib.AbstractContextManager[None]:
        return single_requests()

    def exclusive(self, name: str) -> contextlib.AbstractContextManager[None]:
        # Runs on one machine share the local store: one at a time from lookup to create, so identical
        # runs finishing together make one version, not one each. (A server has no such lock.)
        from filelock import FileLock

        db = sqlite_path(self.uri)
        return FileLock(f"{db}.register.lock", timeout=STORE_INIT_TIMEOUT) if db else contextlib.nullcontext()

    @staticmethod
    def _version(mv) -> RegisteredVersion:
        tags = {str(k): str(v) for k, v in (mv.tags or {}).items()}
        return RegisteredVersion(name=mv.name, version=str(mv.version), content_hash=tags.get(CONTENT_TAG),
                                 tags=tags, uri=f"models:/{mv.name}/{mv.version}")

    def _search(self, query: str, **kwargs) -> list[RegisteredVersion]:
        return [self._version(mv) for mv in self._client.search_model_versions(query, **kwargs)]

    def find(self, name: str, content_hash: str) -> RegisteredVersion | None:
        hits = self._search(f"name = '{_quoted(name)}' and tags.{CONTENT_TAG} = '{_quoted(content_hash)}'",
                            order_by=["version_number ASC"])
        return hits[0] if hits else None

    def latest(self, name: str) -> RegisteredVersion | None:
        hits = self._search(f"name = '{_quoted(name)}'", order_by=["version_number DESC"], max_results=1)
        return hits[0] if hits else None

    def get(self, name: str, version: str) -> RegisteredVersion | None:
        from mlflow.exceptions import MlflowException

        try:
            return self._version(self._client.get_model_version(name, version))
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def create_version(self, name: str, model_dir: Path, content_hash: str, tags: dict[str, str], version: str | None,
                model_uri: str | None) -> RegisteredVersion:
        from mlflow.exceptions import MlflowException

        if not model_uri:
            raise RegistryError(f"registry mlflow: no logged model to register for {model_dir}; "
                                "track the run with log_model=True first")
        if version is not None:
            current = self.latest(name)
            following = str(int(current.version) + 1 if current else 1)
            if version != following:
                raise RegistryError(f"registry mlflow: MLflow numbers versions itself; {name}'s next version is "
                                    f"{following}, not {version}; leave registry.version empty")
        try:
            self._client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
        with using_tracking_uri(self.uri):  # MLflow resolves the models:/m-... source on the global URI
            mv = self._client.create_model_version(name, model_uri, run_id=tags.get("mlflow_run_id"), tags=tags,
                                                   model_id=model_id)
        return self._version(mv)


def _number(version: str) -> int:
    return int(version) if str(version).isdigit() else -1


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


# ---- Azure ML ----

def azure_credential(principal: AzurePrincipal | None = None):
    """A service principal's credential when one is given, else ``DefaultAzureCredential``."""
    if principal is not None and principal.complete():
        from azure.identity import ClientSecretCredential

        options: dict[str, Any] = {}
        if principal.authority_host:
            options["authority"] = principal.authority_host
            # Instance discovery asks the public cloud about the authority: impossible for a private one.
            private = urlsplit(principal.authority_host).hostname not in PUBLIC_AUTHORITIES
            options["disable_instance_discovery"] = private
        return ClientSecretCredential(principal.tenant_id, principal.client_id,
                                      principal.client_secret.get_secret_value(), **options)
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def azure_ml_client(workspace: AzureWorkspace, credential=None, **client_kwargs: Any):
    """An ``MLClient`` for the workspace: explicit values, then environment variables, then config.json.

    ``client_kwargs`` go to ``MLClient`` (a custom ``cloud``/``cloud_metadata``, say). Telemetry
    and progress bars are off by default: a pipeline's logs are not a terminal.
    """
    from azure.ai.ml import MLClient

    credential = credential or azure_credential()
    client_kwargs = {"enable_telemetry": False, "show_progress": False, **AZURE_HTTP_LIMITS, **client_kwargs}
    if workspace.cloud and "cloud" not in client_kwargs:
        client_kwargs["cloud"] = workspace.cloud
    resolved = workspace.resolved()
    if not resolved.missing():
        return MLClient(credential, resolved.subscription_id, resolved.resource_group, resolved.workspace_name,
                        **client_kwargs)
    config_json = workspace.config_path or find_workspace_config()
    if config_json is None:
        raise InputError(registry_settings_errors(RegistryConfig(backend="azureml", azure=workspace))[0])
    return MLClient.from_config(credential, path=str(config_json), **client_kwargs)


class AzureMLRegistry(ModelRegistry):
    """Azure ML workspace models: the folder is uploaded to the workspace's blob store as a custom model."""

    backend = "azureml"
    unavailable_fix = ("check the workspace and its storage account (Azure status page), then re-run "
                       "(the same model is never registered twice)")

    def __init__(self, client, backoff: Backoff | None = None):
        self._client = client  # azure.ai.ml.MLClient
        self.backoff = backoff or Backoff(attempts=3, first=2.0)

    def _transient(self, exc: BaseException) -> bool:
        from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

        for cause in causes(exc):
            if isinstance(cause, (ServiceRequestError, ServiceResponseError)):  # no answer, timeouts included
                return True
            if isinstance(cause, HttpResponseError) and (cause.status_code in (408, 429)
                                                         or (cause.status_code or 0) >= 500):
                return True
        return False

    @staticmethod
    def _version(model) -> RegisteredVersion:
        tags = {str(k): str(v) for k, v in (model.tags or {}).items()}
        content = tags.get(CONTENT_TAG) or (model.properties or {}).get(CONTENT_TAG)
        return RegisteredVersion(name=model.name, version=str(model.version), content_hash=content, tags=tags,
                                 uri=f"azureml:{model.name}:{model.version}")

    def _list(self, name: str) -> list:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return list(self._client.models.list(name=name))
        except ResourceNotFoundError:
            return []

    def _versions(self, name: str) -> list[RegisteredVersion]:
        return [self._version(m) for m in self._list(name)]

    def find(self, name: str, content_hash: str) -> RegisteredVersion | None:
        # Tags are editable in the portal; properties are not, so either one identifies the content.
        for version in self._versions(name):
            if version.content_hash == content_hash:
                return version
        return None

    def latest(self, name: str) -> RegisteredVersion | None:
        # models.get(label="latest") raises a generic ValidationException for an unknown name;
        # listing answers "none" plainly, and "latest" means most recently created, as there.
        models = self._list(name)
        if not models:
            return None
        newest = max(models, key=lambda m: (str(getattr(m.creation_context, "created_at", "") or ""),
                                            _number(m.version)))
        return self._version(newest)

    def get(self, name: str, version: str) -> RegisteredVersion | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self._version(self._client.models.get(name, version=version))
        except ResourceNotFoundError:
            return None

    def create_version(self, name: str, model_dir: Path, content_hash: str, tags: dict[str, str], version: str | None,
                model_uri: str | None) -> RegisteredVersion:
        from azure.ai.ml.constants import AssetTypes
        from azure.ai.ml.entities import Model

        model = Model(path=str(model_dir), name=name, version=version, type=AssetTypes.CUSTOM_MODEL, tags=tags,
                      properties=tags, description="oliveflow: quantized, LoRA-tuned ONNX model for "
                                                   "onnxruntime-genai")
        return self._version(self._client.models.create_or_update(model))
