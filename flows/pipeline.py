"""The parent flow: validate inputs, then quantize -> finetune -> export -> smoke test, each cached.

Run it locally with ``python flows/pipeline.py`` (embedded default) or ``oliveflow run``.
"""

from __future__ import annotations

import contextlib
import itertools
from uuid import UUID

from prefect import flow, get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.runtime import deployment

from flows.server import STARTUP_FAILURE, TemporaryServer, start_server, stop_server, wait_healthy
from oliveflow import progress
from oliveflow.config import PipelineParams, check_registry_settings, overlay
from oliveflow.errors import InputError, ServiceError
from oliveflow.lineage import current_lineage
from oliveflow.mlflow_store import preload_mlflow
from oliveflow.output import check_output_dir, publish
from oliveflow.report import markdown
from oliveflow.results import PipelineResult
from oliveflow.settings import Settings, current, load, use
from oliveflow.stages.table import STAGES, initial_values
from oliveflow.store import ArtifactStore
from tasks.locking import lock_manager
from tasks.publish import register_task, run_context, track_task
from tasks.stages import resolve_model_task, resolve_template_task, run_stage, validate_data_task


def gpu_slot(name: str | None) -> contextlib.AbstractContextManager:
    """Hold the global concurrency limit ``name`` (``$OLIVEFLOW_GPU_LIMIT``, settings.gpu_limit: one limit of 1 per
    GPU).

    Deployments on the GPU pool (deployments/deploy.py) set it next to ``CUDA_VISIBLE_DEVICES``, so runs on
    one GPU queue up, however many workers there are. Unset (local runs): nothing to hold. ``strict``: a
    name with no limit on the server fails the run instead of silently not serializing.
    """
    return concurrency(name, occupy=1, strict=True) if name else contextlib.nullcontext()


def deployment_params() -> dict:
    """The ``params`` of the deployment this run was made from; {} for a run with no deployment (or one since
    deleted: the run then has only its own)."""
    if deployment.id is None:
        return {}
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment(UUID(deployment.id)).parameters.get("params") or {}
        except ObjectNotFound:
            return {}


@flow(name="oliveflow-pipeline")
def pipeline(params: PipelineParams = PipelineParams()) -> PipelineResult:
    """Base checkpoint + JSONL examples -> quantized, LoRA-tuned int4 ONNX model for onnxruntime-genai."""
    # A run's entry point: the settings the caller installed (oliveflow run), else the environment read now (a
    # deployment's run); the whole run then sees these.
    with use(current()) as settings:
        return _pipeline(params, settings)


def _pipeline(params: PipelineParams, settings: Settings) -> PipelineResult:
    params = overlay(deployment_params(), params)  # a run's changes over its deployment's defaults
    check_output_dir(params.output_dir)
    check_registry_settings(params.registry)  # missing Azure workspace settings fail here, before heavy stages
    store, locks = ArtifactStore(params.store_location(settings)), lock_manager(settings)
    progress = create_progress_artifact(0.0, description="oliveflow pipeline: stages done (%)")
    data = validate_data_task(params.data)
    base = resolve_model_task(params.model, params.quantize)
    template = resolve_template_task(params.data, base)  # the model's chat template unless one is given
    values, runs = initial_values(params, base, data, template), []

    # Quantize and finetune hold the GPU together; ModelBuilder runs on the CPU: the GPU is held again only when
    # the model is built and tried for CUDA.
    for holds_gpu, group in itertools.groupby(STAGES, key=lambda stage: stage.holds_gpu):
        with gpu_slot(settings.gpu_limit) if holds_gpu or params.export.device == "gpu" else contextlib.nullcontext():
            for stage in group:
                values[stage.output], stage_run = run_stage(stage, store, locks, values)
                runs.append(stage_run)
                update_progress_artifact(progress, 100.0 * len(runs) / len(STAGES))

    onnx, smoke = values["onnx"], values["smoke"]
    model_dir = publish(onnx.model_dir, params.output_dir) if params.output_dir else onnx.model_dir
    result = PipelineResult(
        onnx_model_dir=model_dir, adapter_file=model_dir / onnx.adapter_name, template=template,
        size_reduction=smoke.size_reduction, samples=smoke.samples, stages={r.name: r for r in runs},
        base_model=base, quantized=values["quantized"], adapter=values["adapter"], onnx=onnx, smoke=smoke)

    lineage = current_lineage(data, base, run_context())
    tracked = track_task(result, params, lineage, params.tracking) if params.tracking.enabled else None
    outcome = register_task(params.registry, result, tracked, lineage)
    get_run_logger().info(outcome.summary)  # "not registered: <reason>" is a normal end, not a failure
    result = result.model_copy(update={"mlflow_run_id": tracked.run_id if tracked else None,
                                       "registration": outcome.summary})
    create_markdown_artifact(markdown(result), key="oliveflow-summary", description="oliveflow run summary")
    return result


# Prefect gives its temporary server 20 s; a fresh $PREFECT_HOME on a busy 2-core machine (load ~6) missed that
# (it also creates its database then). Local runs get this budget unless the user set one.
STARTUP_BUDGET_SECONDS = 300


def run_local(params: PipelineParams | None = None, server: TemporaryServer | None = None) -> PipelineResult:
    """``pipeline(params)`` as a local run starts it: on a temporary Prefect server (``server``, started earlier by
    the caller so that it came up while the caller imported, else started here) unless the user set
    PREFECT_API_URL, a start-up budget sized for a slow machine, one retry if the server still does not come up,
    then one line saying what to do. The servers are stopped before this returns."""
    from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, PREFECT_UI_URL,
                                  get_current_settings, temporary_settings)

    params = params or PipelineParams()
    user_set = current().prefect_startup_timeout is not None or PREFECT_API_URL.value()
    budget = {} if user_set else {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: STARTUP_BUDGET_SECONDS}
    with temporary_settings(updates=budget):
        seconds = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        for attempt in (1, 2):
            try:
                if PREFECT_API_URL.value():  # the user's server (a profile may set it too)
                    return pipeline(params)
                server = server or start_server(get_current_settings().to_environment_variables(exclude_unset=True))
                with progress.task("starting Prefect's temporary server"):
                    if params.tracking.enabled:
                        preload_mlflow()  # while the server starts
                    wait_healthy(server, seconds)
                # No UI on it: no "View at" link to one (Prefect's ephemeral mode prints none either).
                with temporary_settings(updates={PREFECT_API_URL: server.api_url,
                                                 PREFECT_UI_URL: PREFECT_UI_URL.value() or ""}):
                    try:
                        return pipeline(params)
                    finally:
                        _drain_to_server()
            except RuntimeError as exc:  # raised before the flow run exists: retrying cannot run anything twice
                if STARTUP_FAILURE not in str(exc):
                    raise
                if attempt == 2:
                    raise ServiceError(
                        f"Prefect's temporary API server did not start within {seconds} s, twice (a busy machine?); "
                        "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start a server (prefect server "
                        "start) and export PREFECT_API_URL=http://127.0.0.1:4200/api") from None
            finally:
                # Stopped here, not at exit: a half-started server would outlive the process, and a running
                # one's goodbye would be printed after the run's last line.
                if server is not None:
                    stop_server(server)
                    server = None
    raise AssertionError("unreachable")


def _drain_to_server() -> None:
    """What the log and event workers still hold goes to the server before it stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)


if __name__ == "__main__":
    try:
        with use(load()):
            print(markdown(run_local()))
    except (InputError, ServiceError) as error:
        raise SystemExit(f"pipeline: error: {error}") from None
