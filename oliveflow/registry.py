"""Registering a pipeline result: the quality gate, then the registry, idempotently.

Registration runs after tracking and is never cached. It is idempotent on the exported
folder's content hash (tag ``content_sha256``): the same model returns the version that
already holds it. The quality gate (``oliveflow.gate``) decides whether a new version is made at all.

Settings (``RegistryConfig``, the Azure workspace and principal) live in ``oliveflow.config``; the
backends (MLflow, Azure ML) in ``oliveflow.registry_backends``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from oliveflow.config import AzurePrincipal, RegistryConfig, check_registry_settings
from oliveflow.gate import GATE_METRIC, ROUGE_METRIC, Candidate, decide
from oliveflow.lineage import CONTENT_TAG, Lineage, TrackedRun, tracking_uri as default_tracking_uri
from oliveflow.registry_backends import (
    AzureMLRegistry, MlflowRegistry, ModelRegistry, RegisteredVersion, azure_credential, azure_ml_client,
)
from oliveflow.results import PipelineResult


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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
        "smoke_answered": str(smoke.answered).lower(),
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
        tags = registration_tags(result, tracked, lineage)  # CONTENT_TAG included
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
        return MlflowRegistry(tracking_uri or default_tracking_uri())
    check_registry_settings(config)
    return AzureMLRegistry(azure_ml_client(config.azure, credential or azure_credential(principal), **client_kwargs))
