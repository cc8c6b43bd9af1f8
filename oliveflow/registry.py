"""Model registration behind one small interface: the MLflow Model Registry (local default) or Azure ML.

Registration runs after tracking and is never cached. It is idempotent on the exported
folder's content hash (tag ``content_sha256``): the same model returns the version that
already holds it. A quality gate decides whether a new version is made at all.

Clients are built by the factories here (``make_registry``, ``azure_ml_client``), never
inside stage code; tests hand the registries their own clients. Secrets live in
``SecretStr`` fields read from the environment at the entry point and are only unwrapped
when a credential object is built.

A registry that does not answer, or answers 5xx (blob storage timing out included), is tried
again with exponential backoff, then the error is one line. A retried registration first looks
the content hash up: a try whose answer was lost may have made the version, and a second one is
never made.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from oliveflow.errors import InputError, ServiceError
from oliveflow.results import PipelineResult

if TYPE_CHECKING:  # only for annotations: oliveflow.config may import RegistryConfig from here
    from oliveflow.tracking import Backoff, Lineage, TrackedRun

CONTENT_TAG = "content_sha256"
GATE_METRIC = "response_ppl_finetuned"  # held-out perplexity on response tokens, lower is better
ROUGE_METRIC = "rouge_l_finetuned"  # the second check, higher is better
ROUGE_TOLERANCE = 0.02  # a candidate may trail the champion's ROUGE-L by this much (greedy answers are noisy)
# Azure ML's rule for asset names; MLflow takes any, so one rule keeps the backends interchangeable.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$"
PUBLIC_AUTHORITIES = {"login.microsoftonline.com", "login.chinacloudapi.cn", "login.microsoftonline.us"}
WORKSPACE_ENV = {"subscription_id": "AZURE_SUBSCRIPTION_ID", "resource_group": "AZURE_RESOURCE_GROUP",
                 "workspace_name": "AZUREML_WORKSPACE_NAME"}
# azure-core's own retries of one ARM request (defaults: 10 retries, up to 120 s apart: many minutes before
# an outage is reported). Bounded here unless the caller passes its own; the registry retries on top.
AZURE_HTTP_LIMITS = {"retry_total": 2, "retry_backoff_factor": 0.5, "retry_backoff_max": 8}
_log = logging.getLogger(__name__)
_T = TypeVar("_T")


class RegistryError(ServiceError):
    """The registry refused or could not take the model; the message says what to do."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---- settings ----

class AzureWorkspace(_Frozen):
    """Which Azure ML workspace to register in. No secrets here: these are flow parameters."""

    subscription_id: str | None = Field(None, description="Azure subscription id (else $AZURE_SUBSCRIPTION_ID).")
    resource_group: str | None = Field(None, description="Resource group of the workspace (else "
                                                         "$AZURE_RESOURCE_GROUP).")
    workspace_name: str | None = Field(None, description="Azure ML workspace name (else $AZUREML_WORKSPACE_NAME).")
    config_path: Path | None = Field(None, description="A workspace config.json (downloaded from the portal); "
                                                       "searched for in the working folder and its parents "
                                                       "when the three values above are not all set.")
    cloud: str | None = Field(None, description="Azure cloud name (AzureCloud, AzureChinaCloud, "
                                                "AzureUSGovernment); default AzureCloud.")

    def resolved(self, environ: dict[str, str] | None = None) -> AzureWorkspace:
        """Fill the fields left empty from the environment variables."""
        environ = os.environ if environ is None else environ
        values = {field: getattr(self, field) or environ.get(var) or None for field, var in WORKSPACE_ENV.items()}
        return self.model_copy(update=values)

    def missing(self) -> list[str]:
        return [field for field in WORKSPACE_ENV if not getattr(self, field)]


class AzurePrincipal(_Frozen):
    """A service principal, read from the environment at the entry point (never a flow parameter).

    When absent, ``DefaultAzureCredential`` finds a credential itself (managed identity,
    ``az login``, workload identity, or these same variables).
    """

    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    authority_host: str | None = Field(None, description="Entra ID host of a private or sovereign cloud "
                                                         "(else azure-identity's default for AzureCloud).")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> AzurePrincipal | None:
        """AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET (and AZURE_AUTHORITY_HOST); None if incomplete."""
        environ = os.environ if environ is None else environ
        secret = environ.get("AZURE_CLIENT_SECRET")
        principal = cls(tenant_id=environ.get("AZURE_TENANT_ID"), client_id=environ.get("AZURE_CLIENT_ID"),
                        client_secret=SecretStr(secret) if secret else None,
                        authority_host=environ.get("AZURE_AUTHORITY_HOST") or None)
        return principal if principal.complete() else None

    def complete(self) -> bool:
        return bool(self.tenant_id and self.client_id and self.client_secret)


class RegistryConfig(_Frozen):
    """Where and whether the finished model is registered."""

    backend: Literal["mlflow", "azureml", "none"] = Field(
        "mlflow", description="mlflow: the MLflow Model Registry on the tracking store; azureml: an Azure ML "
                              "workspace; none: do not register.")
    model_name: str = Field("oliveflow-model", pattern=NAME_PATTERN,
                            description="Registered model name (letters, digits, '.', '_', '-').")
    version: str | None = Field(None, description="Version to register as; empty lets the registry number it. "
                                                  "An existing version holding a different model is an error.")
    force: bool = Field(False, description="Register even if the quality gate says no (smoke test failed or "
                                           "eval loss worse than the current latest version).")
    azure: AzureWorkspace = Field(default_factory=AzureWorkspace, description="Azure ML workspace (azureml only).")


def _find_config_json(start: Path | None = None) -> Path | None:
    """Where ``MLClient.from_config`` would look: config.json or .azureml/config.json, upwards."""
    folder = (start or Path.cwd()).resolve()
    for candidate_dir in (folder, *folder.parents):
        for name in ("config.json", ".azureml/config.json"):
            path = candidate_dir / name
            if path.is_file():
                return path
    return None


def _config_json_missing(path: Path) -> list[str]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return list(WORKSPACE_ENV)
    keys = {"subscription_id": "subscription_id", "resource_group": "resource_group",
            "workspace_name": "workspace_name"}
    return [field for field, key in keys.items() if not values.get(key)]


def registry_settings_errors(config: RegistryConfig, environ: dict[str, str] | None = None,
                             cwd: Path | None = None) -> list[str]:
    """Problems with the registry settings, each a line a person can act on; [] when usable.

    Cheap (no network): call it at flow start, before any heavy stage.
    """
    if config.backend != "azureml":
        return []
    workspace = config.azure.resolved(environ)
    missing = workspace.missing()
    if not missing:
        return []
    config_json = workspace.config_path or _find_config_json(cwd)
    if config_json is not None:
        if not config_json.is_file():
            return [f"registry azureml: workspace config {config_json} does not exist; "
                    "fix registry.azure.config_path or set the workspace values"]
        still = _config_json_missing(config_json)
        if not still:
            return []
        return [f"registry azureml: {config_json} lacks {', '.join(still)}; add them, or set "
                + ", ".join(f"registry.azure.{m} (${WORKSPACE_ENV[m]})" for m in missing)]
    return ["registry azureml: missing " + ", ".join(f"registry.azure.{m} (${WORKSPACE_ENV[m]})" for m in missing)
            + "; set them as flow parameters or environment variables, or put the workspace's config.json "
              "in the working folder (registry.azure.config_path)"]


def check_registry_settings(config: RegistryConfig, environ: dict[str, str] | None = None) -> None:
    errors = registry_settings_errors(config, environ)
    if errors:
        raise InputError("; ".join(errors))


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
    """A model registry: find by content, the latest version, register a folder.

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
                                        f"{type(exc).__name__}: {_one_line(exc)}; {self.unavailable_fix}") from exc
                _log.warning("registry %s: %s failed (%s: %s); try %d of %d in %.1f s", self.backend, what,
                             type(exc).__name__, _one_line(exc, 200), attempt + 1, len(waits) + 1, waits[attempt - 1])
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
        """Make a new version, no questions asked: ``register``/``register_model`` rule out duplicates first."""

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

    def register(self, name: str, model_dir: Path, content_hash: str, tags: dict[str, str],
                 version: str | None = None, *, model_uri: str | None = None) -> RegisteredVersion:
        """Register ``model_dir``; the same content returns its existing version instead of a new one.

        ``model_uri``: the model as the tracking store logged it, for backends that
        reference it rather than upload the folder (MLflow).
        """
        with self.exclusive(name):
            found = self.existing(name, content_hash, version)
            if found is not None:
                return found
            return self.create_once(name, Path(model_dir), content_hash, tags, version, model_uri)


# ---- MLflow Model Registry ----

class MlflowRegistry(ModelRegistry):
    """The MLflow Model Registry of a tracking store; versions point at the run's logged pyfunc model."""

    backend = "mlflow"

    def __init__(self, uri: str, client=None, backoff: Backoff | None = None):
        from mlflow import MlflowClient

        from oliveflow.tracking import Backoff, prepare_store, public_uri

        prepare_store(uri)  # a new local store is created here, under its lock; a damaged one fails here
        self.uri = uri  # tracking and registry store: the one the run and its model were logged to
        self._client = client or MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.backoff = backoff or Backoff.for_mlflow()
        self.unavailable_fix = (f"check that the MLflow server {public_uri(uri)} is up, then re-run (the same "
                                "model is never registered twice)")

    def _transient(self, exc: BaseException) -> bool:
        from oliveflow.tracking import transient

        return transient(exc, self.uri)

    def _damage(self, exc: BaseException) -> Exception | None:
        from oliveflow.tracking import sqlite_path, store_damage

        return store_damage(exc, sqlite_path(self.uri))

    def _single_requests(self) -> contextlib.AbstractContextManager[None]:
        from oliveflow.tracking import single_requests

        return single_requests()

    def exclusive(self, name: str) -> contextlib.AbstractContextManager[None]:
        # Runs on one machine share the local store: one at a time from lookup to create, so identical
        # runs finishing together make one version, not one each. (A server has no such lock.)
        from filelock import FileLock

        from oliveflow.tracking import STORE_INIT_TIMEOUT, sqlite_path

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
        from oliveflow.tracking import using_tracking_uri

        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
        with using_tracking_uri(self.uri):  # MLflow resolves the models:/m-... source on the global URI
            mv = self._client.create_model_version(name, model_uri, run_id=tags.get("mlflow_run_id"), tags=tags,
                                                   model_id=model_id)
        return self._version(mv)


def _number(version: str) -> int:
    return int(version) if str(version).isdigit() else -1


def _one_line(exc: BaseException, limit: int = 300) -> str:
    from oliveflow.tracking import _one_line as one_line

    return one_line(exc, limit)


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
    config_json = workspace.config_path or _find_config_json()
    if config_json is None:
        raise InputError(registry_settings_errors(RegistryConfig(backend="azureml", azure=workspace))[0])
    return MLClient.from_config(credential, path=str(config_json), **client_kwargs)


class AzureMLRegistry(ModelRegistry):
    """Azure ML workspace models: the folder is uploaded to the workspace's blob store as a custom model."""

    backend = "azureml"
    unavailable_fix = ("check the workspace and its storage account (Azure status page), then re-run "
                       "(the same model is never registered twice)")

    def __init__(self, client, backoff: Backoff | None = None):
        from oliveflow.tracking import Backoff

        self._client = client  # azure.ai.ml.MLClient
        self.backoff = backoff or Backoff(attempts=3, first=2.0)

    def _transient(self, exc: BaseException) -> bool:
        from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

        from oliveflow.errors import causes

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


# ---- the quality gate ----

@dataclass(frozen=True)
class GateDecision:
    # A dataclass: a pydantic field named "register" would shadow ABCMeta.register on BaseModel.
    register: bool
    reason: str


@dataclass(frozen=True)
class Candidate:
    """What the gate judges a new model on."""

    eval_losses: tuple[float | None, ...]  # original, quantized, fine-tuned: each must be finite when present
    response_ppl: float | None
    rouge_l: float | None
    smoke_passed: bool

    @classmethod
    def of(cls, result: PipelineResult) -> Candidate:
        adapter = result.adapter
        return cls(eval_losses=(adapter.eval_loss_original, adapter.eval_loss_quantized, adapter.eval_loss_finetuned,
                                adapter.response_ppl_finetuned),
                   response_ppl=adapter.response_ppl_finetuned, rouge_l=result.smoke.rouge_l_finetuned,
                   smoke_passed=result.smoke.passed)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def decide(candidate: Candidate, champion: RegisteredVersion | None, force: bool = False) -> GateDecision:
    """Register only a finite model that passed its smoke test and is not worse than the champion.

    ``force`` overrides the comparison with the champion, never the numerical checks: a model with a
    non-finite loss or a failed smoke test is never registered.
    """
    broken = [v for v in candidate.eval_losses if v is not None and not math.isfinite(v)]
    if broken:
        return GateDecision(register=False, reason=f"a held-out loss is not finite ({broken[0]}); a numerically "
                                                   "broken model is never registered")
    if not candidate.smoke_passed:
        return GateDecision(register=False, reason="the smoke test failed")
    verdict = _judge(candidate, champion)
    if force and not verdict.register:
        return GateDecision(register=True, reason=f"forced (the gate said: {verdict.reason})")
    return verdict


def _judge(candidate: Candidate, champion: RegisteredVersion | None) -> GateDecision:
    if champion is None:
        return GateDecision(register=True, reason="no version registered under this name yet")
    # A metric tag that is there but not a number was edited or damaged: comparing would mean guessing,
    # so the gate refuses (force overrides), where a missing one just has nothing to beat.
    unreadable = champion.unreadable(GATE_METRIC, ROUGE_METRIC)
    if unreadable:
        key, value = next(iter(unreadable.items()))
        return GateDecision(register=False, reason=f"champion {champion.name} v{champion.version}'s tag {key} is "
                                                   f"{value[:40]!r}, not a number; set it to the version's value "
                                                   "or remove it, or set registry.force to register anyway")
    best = champion.metric(GATE_METRIC)
    if best is None:
        return GateDecision(register=True, reason=f"champion v{champion.version} has no {GATE_METRIC} to beat")
    if not _finite(candidate.response_ppl):
        return GateDecision(register=False, reason=f"no finite {GATE_METRIC} (eval data missing?) to compare "
                                                   f"with champion v{champion.version}'s {best:.4f}")
    if candidate.response_ppl > best:
        return GateDecision(register=False, reason=f"{GATE_METRIC} {candidate.response_ppl:.4f} is worse than "
                                                   f"champion v{champion.version}'s {best:.4f}")
    best_rouge = champion.metric(ROUGE_METRIC)
    if best_rouge is not None and _finite(candidate.rouge_l) and candidate.rouge_l < best_rouge - ROUGE_TOLERANCE:
        return GateDecision(register=False, reason=f"{GATE_METRIC} {candidate.response_ppl:.4f} is not worse, but "
                                                   f"{ROUGE_METRIC} {candidate.rouge_l:.4f} trails champion "
                                                   f"v{champion.version}'s {best_rouge:.4f} by more than "
                                                   f"{ROUGE_TOLERANCE}")
    return GateDecision(register=True, reason=f"{GATE_METRIC} {candidate.response_ppl:.4f} <= champion "
                                              f"v{champion.version}'s {best:.4f}")


# ---- registering a pipeline result ----

class RegistrationOutcome(_Frozen):
    """What registration did; ``registered=False`` is a normal end of the flow, not a failure."""

    backend: str
    name: str
    registered: bool
    already_registered: bool = Field(False, description="The same content was registered before; no new version.")
    version: RegisteredVersion | None = None
    reason: str

    @property
    def summary(self) -> str:
        if not self.registered or self.version is None:
            return f"not registered: {self.reason}"
        how = "already registered as" if self.already_registered else "registered"
        return f"{how} {self.name} v{self.version.version} ({self.backend}; {self.reason})"


def _fmt(value: float | None) -> str | None:
    return None if value is None else f"{value:.6g}"


def registration_tags(result: PipelineResult, tracked: TrackedRun | None, lineage: Lineage) -> dict[str, str]:
    """Lineage and key metrics carried by the registered version (tags, and properties in Azure ML)."""
    adapter, smoke = result.adapter, result.smoke
    tags: dict[str, str | None] = {
        **lineage.tags(),
        CONTENT_TAG: result.onnx.artifact.sha256,
        "eval_loss_original": _fmt(adapter.eval_loss_original),
        "eval_loss_quantized": _fmt(adapter.eval_loss_quantized),
        "eval_loss_finetuned": _fmt(adapter.eval_loss_finetuned),
        "response_ppl_original": _fmt(adapter.response_ppl_original),
        "response_ppl_quantized": _fmt(adapter.response_ppl_quantized),
        GATE_METRIC: _fmt(adapter.response_ppl_finetuned),
        "rouge_l_base": _fmt(smoke.rouge_l_base),
        ROUGE_METRIC: _fmt(smoke.rouge_l_finetuned),
        "size_reduction": _fmt(result.size_reduction),
        "size_bytes": str(smoke.size_after_bytes),
        "ttft_ms": _fmt(smoke.ttft_seconds * 1000),
        "decode_tokens_per_second": _fmt(smoke.decode_tokens_per_second),
        "smoke_passed": str(smoke.passed).lower(),
        "quantize": f"{result.quantized.algorithm} int{result.quantized.bits} g{result.quantized.group_size}",
    }
    if tracked is not None:
        tags.update(mlflow_run_id=tracked.run_id, mlflow_experiment=tracked.experiment_name,
                    mlflow_tracking_uri=tracked.tracking_uri, mlflow_model_uri=tracked.model_uri)
    return {k: v for k, v in tags.items() if v is not None}


def register_model(registry: ModelRegistry, name: str, result: PipelineResult, tracked: TrackedRun | None,
                   lineage: Lineage, force: bool = False, version: str | None = None) -> RegistrationOutcome:
    """Gate, then register idempotently; same content -> the existing version, never a second one."""
    content_hash = result.onnx.artifact.sha256
    with registry.exclusive(name):
        found = registry.existing(name, content_hash, version)  # raises on a version holding other content
        if found is not None:
            reason = "same content hash" if version in (None, found.version) else \
                f"this content is already version {found.version} (requested version {version} not made)"
            return RegistrationOutcome(backend=registry.backend, name=name, registered=True, already_registered=True,
                                       version=found, reason=reason)
        champion = registry.retrying(f"reading the latest version of {name}", lambda: registry.latest(name))
        gate = decide(Candidate.of(result), champion, force)
        if not gate.register:
            return RegistrationOutcome(backend=registry.backend, name=name, registered=False, reason=gate.reason)
        tags = {**registration_tags(result, tracked, lineage), CONTENT_TAG: content_hash}
        created = registry.create_once(name, Path(result.onnx_model_dir), content_hash, tags, version,
                                       tracked.model_uri if tracked else None)
    return RegistrationOutcome(backend=registry.backend, name=name, registered=True, version=created,
                               reason=gate.reason)


def make_registry(config: RegistryConfig, *, tracking_uri: str | None = None, principal: AzurePrincipal | None = None,
                  credential=None, **client_kwargs: Any) -> ModelRegistry | None:
    """The registry the config names (None for backend "none"); clients are built here, not in stages."""
    if config.backend == "none":
        return None
    if config.backend == "mlflow":
        from oliveflow.tracking import tracking_uri as default_uri

        return MlflowRegistry(tracking_uri or default_uri())
    check_registry_settings(config)
    return AzureMLRegistry(azure_ml_client(config.azure, credential or azure_credential(principal), **client_kwargs))
