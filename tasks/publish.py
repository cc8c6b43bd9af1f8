"""Side-effect tasks after the stages: MLflow tracking, then registration. Never cached."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from oliveflow import progress
from oliveflow.config import AzurePrincipal, RegistryConfig, TrackingConfig
from oliveflow.lineage import Lineage, RunContext, TrackedRun
from oliveflow.mlflow_store import TrackingError
from oliveflow.registry import RegistrationOutcome, make_registry, register_model
from oliveflow.results import PipelineResult
from oliveflow.run_payloads import experiment_name
from oliveflow.tracking import track_run


def run_context() -> RunContext:
    """The current Prefect flow run as plain values, for the lineage (``oliveflow/`` never imports Prefect).

    Outside a flow run every value is None, as tracking outside Prefect has them."""
    from prefect.runtime import deployment, flow_run

    return RunContext(flow_name=flow_run.flow_name, flow_run_id=flow_run.id, flow_run_name=flow_run.name,
                      flow_run_url=flow_run.ui_url, deployment_name=deployment.name)


def _tracking_failed(task, task_run, state) -> bool:
    """Retry a tracking server hiccup once more; track_run already retried each request a little.

    A damaged local store (CorruptStoreError, not a TrackingError) is not retried: it needs a person.
    """
    try:
        state.result()
    except TrackingError:
        return True
    except Exception:
        return False
    return False


@task(name="track_run", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10, retry_condition_fn=_tracking_failed)
def track_task(result: PipelineResult, params: BaseModel, lineage: Lineage, config: TrackingConfig) -> TrackedRun:
    with progress.task("tracking in MLflow"):
        return track_run(result, params, lineage, config.experiment or experiment_name(lineage),
                         log_model=config.log_model)


# No task retries: the registry retries each call itself, with backoff, looking the content hash up before
# any second create (oliveflow.registry_backends); another round here would only repeat those waits.
@task(name="register_model", cache_policy=NO_CACHE)
def register_task(config: RegistryConfig, result: PipelineResult, tracked: TrackedRun | None,
                  lineage: Lineage) -> RegistrationOutcome:
    # A service principal's secret comes from the run's settings (the environment, read when the run started),
    # as a SecretStr, never a flow parameter.
    registry = make_registry(config, principal=AzurePrincipal.from_env())
    if registry is None:
        return RegistrationOutcome(backend="none", name=config.model_name, registered=False,
                                   reason="registry.backend is none")
    with progress.task(f"registering ({config.backend})"):
        return register_model(registry, config.model_name, result, tracked, lineage, force=config.force,
                              version=config.version)
