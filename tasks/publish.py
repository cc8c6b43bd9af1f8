"""Side-effect tasks after the stages: MLflow tracking, then registration. Never cached."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from oliveflow.config import TrackingConfig
from oliveflow.registry import AzurePrincipal, RegistrationOutcome, RegistryConfig, make_registry, register_model
from oliveflow.results import PipelineResult
from oliveflow.tracking import Lineage, TrackedRun, TrackingError, experiment_name, track_run


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
    return track_run(result, params, lineage, config.experiment or experiment_name(lineage),
                     log_model=config.log_model)


# No task retries: the registry retries each call itself, with backoff, looking the content hash up before
# any second create (oliveflow.registry); another round here would only repeat those waits.
@task(name="register_model", cache_policy=NO_CACHE)
def register_task(config: RegistryConfig, result: PipelineResult, tracked: TrackedRun | None,
                  lineage: Lineage) -> RegistrationOutcome:
    # The entry point for this side effect: a service principal's secret is read from the environment here,
    # as a SecretStr, never a flow parameter.
    registry = make_registry(config, principal=AzurePrincipal.from_env())
    if registry is None:
        return RegistrationOutcome(backend="none", name=config.model_name, registered=False,
                                   reason="registry.backend is none")
    return register_model(registry, config.model_name, result, tracked, lineage, force=config.force,
                          version=config.version)
