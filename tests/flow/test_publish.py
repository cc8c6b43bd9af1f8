"""Tracking and registration at the end of the flow: the gate, idempotency, a tracking server that is down."""

import mlflow
import pytest

from flows.pipeline import pipeline
from oliveflow.config import FinetuneConfig, PipelineParams, QuantizeConfig, SmokeTestConfig
from oliveflow.store import ArtifactStore
from oliveflow.mlflow_store import TrackingError
from oliveflow.lineage import CONTENT_TAG

FAST = dict(quantize=QuantizeConfig(algorithm="rtn", size_budget=None), finetune=FinetuneConfig(max_steps=5),
            smoke_test=SmokeTestConfig(num_samples=1, max_new_tokens=8))


def test_each_run_is_tracked_and_registration_is_idempotent():
    params = PipelineParams(**FAST, registry={"model_name": "publish-test", "force": True})
    first = pipeline(params)
    assert first.mlflow_run_id and first.registration.startswith("registered publish-test v1")
    again = pipeline(params)
    assert again.mlflow_run_id != first.mlflow_run_id, "every flow run is its own MLflow run"
    assert "already registered as publish-test v1" in again.registration
    from oliveflow.lineage import tracking_uri

    client = mlflow.MlflowClient(tracking_uri())
    run = client.get_run(first.mlflow_run_id)
    assert run.data.params["finetune.max_steps"] == "5"
    assert run.data.tags[CONTENT_TAG] == first.onnx.artifact.sha256
    assert run.data.tags["flow_run_id"]
    assert {"size.reduction", "latency.ttft_ms.adapter", "eval_loss_finetuned", "response_ppl_finetuned",
            "rouge_l_finetuned"} <= set(run.data.metrics)


def test_quality_gate_refuses_a_worse_model():
    champion = pipeline(PipelineParams(**{**FAST, "finetune": FinetuneConfig(max_steps=20)},
                                       registry={"model_name": "gate-test", "force": True}))
    assert champion.registration.startswith("registered gate-test v1")
    worse = pipeline(PipelineParams(**{**FAST, "finetune": FinetuneConfig(max_steps=2)},
                                    registry={"model_name": "gate-test"}))
    assert worse.adapter.response_ppl_finetuned > champion.adapter.response_ppl_finetuned
    assert worse.registration.startswith("not registered:"), worse.registration


def test_tracking_server_down_fails_clearly_and_keeps_artifacts(monkeypatch):
    params = PipelineParams(**FAST, registry={"backend": "none"})
    built = pipeline(params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(TrackingError, match="127.0.0.1:9"):
        pipeline(params)
    store = ArtifactStore(params.store_location())
    assert store.lookup("export", built.onnx.artifact.path.name) is not None
