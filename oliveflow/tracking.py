"""MLflow tracking of one pipeline run: parameters, metrics, samples, configs, a chart, lineage, the model.

Plain functions, no Prefect import: the flow's tracking task calls ``track_run`` after the
stages. Tracking only reads the stage outputs, so a tracking server that is down fails
this step (with one line, after a few tries) and leaves the built artifacts in the store
and Prefect's cache for the next attempt.

What is logged is built by ``oliveflow.run_payloads`` (pure); where it goes (``tracking_uri``) and the
store's creation, retries and damage by ``oliveflow.mlflow_store``. This module is the writing.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from oliveflow.hashing import config_sha256
from oliveflow.lineage import CONTENT_TAG, Lineage, TrackedRun, public_uri, tracking_uri
from oliveflow.mlflow_store import (
    TrackingError, artifact_root, check_tracking, http_limits, one_line, run_url, sqlite_path, store_damage,
    using_tracking_uri,
)
from oliveflow.results import PipelineResult
from oliveflow.run_payloads import (
    CHART_FILE, DEFAULT_EXPERIMENT, SAMPLES_FILE, SENSITIVITY_FILE, TRADEOFF_CHART, TRADEOFF_FILE, flatten_params,
    olive_configs, prompt_template, run_metrics, run_tags, samples_table, size_latency_png, tradeoff_chart,
    tradeoff_row, tradeoff_table,
)

MODEL_ARTIFACT = "model"
_BATCH = 100  # MLflow's per-request cap on params/tags


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
    return {CONTENT_TAG: result.onnx.artifact.sha256, "pyfunc_config_sha256": config_sha256(config)}


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
    with using_tracking_uri(uri), mlflow.start_run(run_id=run_id, nested=False), warnings.catch_warnings():
        # The explicit signature describes the input; an example would make MLflow run the model at every log.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=str(Path(mlflow_model.__file__)),
            artifacts={"model_dir": str(result.onnx_model_dir)}, model_config=config, signature=signature,
            pip_requirements=[*requirements, "pandas"], tags=tags)
    return info.model_uri


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
    with http_limits():
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
            _log_tradeoff(client, experiment_id, run_id, flatten_params(params), run_metrics(result), result)
            model_uri = _log_model(client, uri, experiment_id, run_id, result, params) if log_model else None
            client.set_terminated(run_id, "FINISHED")
        except Exception as exc:
            _mark_failed(client, run_id)
            damage = store_damage(exc, sqlite_path(uri))
            if damage is not None:
                raise damage from exc
            raise TrackingError(f"tracking: logging to {public_uri(uri)} failed ({type(exc).__name__}: "
                                f"{one_line(exc)}); the built model stays in the artifact store and cache, "
                                "re-run to track it") from exc
    return TrackedRun(tracking_uri=public_uri(uri), experiment_id=experiment_id, experiment_name=experiment,
                      run_id=run_id, run_url=run_url(uri, experiment_id, run_id), model_uri=model_uri)


def _log_tradeoff(client, experiment_id: str, run_id: str, params: dict[str, str], metrics: dict[str, float],
                  result: PipelineResult) -> None:
    """The size / quality table and chart over this experiment's runs (this one included), and the quantize
    stage's per-layer sensitivity when it measured one."""
    rows = [tradeoff_row(params, metrics, run_id)]
    for run in client.search_runs([experiment_id], max_results=200, order_by=["attributes.start_time DESC"]):
        if run.info.run_id != run_id and "size.onnx_bytes" in run.data.metrics:
            rows.append(tradeoff_row(run.data.params, run.data.metrics, run.info.run_id))
    client.log_table(run_id, tradeoff_table(rows), TRADEOFF_FILE)
    client.log_figure(run_id, tradeoff_chart(rows, run_id), TRADEOFF_CHART)
    plan = result.quantized.plan_file
    if plan.is_file():
        costs = json.loads(plan.read_text())
        client.log_table(run_id, {"unit": list(costs["costs"]), "loss_increase_at_low_bits": list(costs["costs"].values()),
                                  "bits": [costs["high_bits"] if u in costs["promoted"] else costs["low_bits"]
                                           for u in costs["costs"]]}, SENSITIVITY_FILE)


def _mark_failed(client, run_id: str | None) -> None:
    if run_id is None:
        return
    with contextlib.suppress(Exception):  # the store may be what failed
        client.set_terminated(run_id, "FAILED")
