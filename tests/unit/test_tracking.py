"""MLflow tracking on a real local SQLite store: what one pipeline run logs, where, and how it fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from oliveflow.config import REPO_ROOT
from oliveflow.lineage import (
    Lineage,
    current_lineage,
    default_tracking_uri,
    tracking_uri,
)
from oliveflow.mlflow_store import (
    CorruptStoreError,
    TrackingError,
    artifact_root,
    prepare_store,
)
from oliveflow.run_payloads import experiment_name, flatten_params, size_latency_png
from oliveflow.tracking import track_run
from oliveflow.lineage import CONTENT_TAG


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_default_store_is_a_fixed_place_not_the_working_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OLIVEFLOW_HOME", str(tmp_path / "home"))
    assert tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}" == default_tracking_uri()
    assert artifact_root(tracking_uri()) == tmp_path / "home" / "mlflow" / "artifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri() == "http://mlflow.example:5000"
    assert artifact_root(tracking_uri()) is None, "a server decides where its artifacts go"


def test_params_are_flattened_with_dotted_names(run_params):
    flat = flatten_params(run_params)
    assert flat["finetune.r"] == "16" and flat["quantize.algorithm"] == "awq+gptq"
    assert flat["smoke_test.max_new_tokens"] == "12" and flat["data.template"] == "null"  # empty: the model's own template
    assert flat["finetune.target_modules"] == "null" and flat["model"] == run_params.model


def test_lineage_reads_git_and_the_prefect_runtime(monkeypatch, tmp_path, chain):
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    outside = current_lineage(chain["data"], chain["base"])
    assert outside.git_commit == (head.stdout.strip() if head.returncode == 0 else None)
    assert outside.flow_run_id is None and outside.data_sha256 == chain["data"].train_sha256
    assert outside.base_model_sha256 == chain["base"].artifact.sha256
    assert current_lineage(repo=tmp_path).git_commit is None, "not a git checkout"
    # prefect.runtime takes these overrides; inside a flow run it reads the run context instead. The flow passes
    # them in (tasks.publish.run_context): oliveflow/ itself never imports Prefect.
    from tasks.publish import run_context

    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", "run-123")
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__UI_URL", "http://prefect:4200/runs/flow-run/run-123")
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__FLOW_NAME", "oliveflow-pipeline")
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", "nightly")
    inside = current_lineage(run=run_context())
    assert (inside.flow_run_id, inside.flow_run_url) == ("run-123", "http://prefect:4200/runs/flow-run/run-123")
    assert experiment_name(inside) == "nightly"
    assert experiment_name(Lineage(flow_name="oliveflow-pipeline")) == "oliveflow-pipeline"


def test_run_has_params_metrics_and_lineage_tags(tracked, mlflow_uri, pipeline_result, lineage, run_params):
    run = _client(mlflow_uri).get_run(tracked.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tidy-olive"
    assert flatten_params(run_params).items() <= run.data.params.items()  # log_model adds the model config
    metrics, smoke = run.data.metrics, pipeline_result.smoke
    for stage, cache in (("quantize", 0.0), ("finetune", 1.0), ("export", 0.0), ("smoke_test", 0.0)):
        assert metrics[f"stage.{stage}.cache_hit"] == cache and f"stage.{stage}.seconds" in metrics
    assert run.data.tags["stage.finetune.cache"] == "hit"
    assert metrics["size.original_bytes"] == smoke.size_before_bytes
    assert metrics["size.onnx_bytes"] == smoke.size_after_bytes
    assert metrics["size.reduction"] == pytest.approx(pipeline_result.size_reduction) and metrics["size.reduction"] > 1
    assert metrics["latency.ttft_ms.adapter"] == pytest.approx(smoke.ttft_seconds * 1000)
    assert metrics["latency.ttft_ms.base"] == pytest.approx(smoke.ttft_seconds_base * 1000)
    assert metrics["latency.decode_tokens_per_second.base"] == pytest.approx(smoke.decode_tokens_per_second_base)
    assert {"latency.token_p50_ms.adapter", "latency.token_p90_ms.adapter", "smoke.answered"} <= set(metrics)
    adapter = pipeline_result.adapter
    assert metrics["eval_loss_finetuned"] == pytest.approx(adapter.eval_loss_finetuned)
    assert metrics["eval_loss_original"] == pytest.approx(adapter.eval_loss_original)
    assert metrics["eval_loss_quantized"] == pytest.approx(adapter.eval_loss_quantized)
    tags = run.data.tags
    assert tags["data_sha256"] == lineage.data_sha256 and tags["base_model_sha256"] == lineage.base_model_sha256
    assert tags["base_model"] == pipeline_result.base_model.spec
    assert tags["flow_run_id"] == "0f1e2d3c-run" and tags["flow_run_url"].endswith("/runs/flow-run/0f1e2d3c-run")
    assert tags[CONTENT_TAG] == pipeline_result.onnx.artifact.sha256
    if lineage.git_commit:
        assert tags["git_commit"] == tags["mlflow.source.git.commit"] == lineage.git_commit


def test_train_loss_is_logged_per_step(tracked, mlflow_uri, pipeline_result):
    history = _client(mlflow_uri).get_metric_history(tracked.run_id, "train_loss")
    assert [m.step for m in history] == list(range(len(pipeline_result.adapter.train_loss))) and len(history) == 30
    assert [m.value for m in history] == pytest.approx(pipeline_result.adapter.train_loss)


def test_artifacts_configs_samples_and_chart(tracked, mlflow_uri, pipeline_result, run_params, tmp_path):
    client = _client(mlflow_uri)

    def artifact(path: str) -> Path:
        return Path(client.download_artifacts(tracked.run_id, path, str(tmp_path)))

    for stage in ("quantize", "finetune", "export"):
        assert "passes" in json.loads(artifact(f"olive_configs/{stage}/olive_config.json").read_text())
    samples = json.loads(artifact("samples.json").read_text())
    assert samples["columns"] == ["prompt", "reference", "base_answer", "finetuned_answer"]
    assert len(samples["data"]) == 2
    assert [row[0] for row in samples["data"]] == [s.prompt for s in pipeline_result.samples]
    assert [row[1] for row in samples["data"]] == [s.reference for s in pipeline_result.samples]
    assert [row[3] for row in samples["data"]] == [s.finetuned_answer for s in pipeline_result.samples]
    chart = artifact("charts/size_latency.png").read_bytes()
    assert chart[:8] == b"\x89PNG\r\n\x1a\n" and len(chart) > 5000
    # The size / quality trade-off over the experiment's runs, this one included, and the layers' costs.
    tradeoff = json.loads(artifact("tradeoff.json").read_text())
    row = dict(zip(tradeoff["columns"], next(r for r in tradeoff["data"] if r[0] == tracked.run_id)))
    assert row["algorithm"] == pipeline_result.quantized.algorithm
    assert row["response_ppl_finetuned"] == pytest.approx(pipeline_result.adapter.response_ppl_finetuned)
    logged = flatten_params(run_params)
    assert [row[k] for k in ("train_scales", "init", "distill")] == [
        logged[f"finetune.{k}"] for k in ("train_scales", "init", "distill")]
    assert row["size.onnx_bytes"] == pipeline_result.smoke.size_after_bytes
    assert artifact("charts/size_vs_perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sensitivity = json.loads(artifact("quantize_sensitivity.json").read_text())
    assert sensitivity["columns"] == ["unit", "loss_increase_at_low_bits", "bits"]
    assert {r[0] for r in sensitivity["data"]} == {"layers.0", "layers.1", "lm_head"}
    assert sorted(r[0] for r in sensitivity["data"] if r[2] == 8) == sorted(pipeline_result.quantized.promoted)
    result = json.loads(artifact("pipeline_result.json").read_text())
    assert result["onnx"]["artifact"]["sha256"] == pipeline_result.onnx.artifact.sha256
    # Artifacts sit beside the SQLite database, not in ./mlruns of the working folder.
    assert client.get_experiment(tracked.experiment_id).artifact_location.startswith(
        Path(mlflow_uri.removeprefix("sqlite:///")).parent.as_uri())


def test_the_chart_is_drawn_once_per_content(monkeypatch, tmp_path, pipeline_result):
    monkeypatch.setenv("OLIVEFLOW_HOME", str(tmp_path))
    first = size_latency_png(pipeline_result)
    assert first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and first.is_relative_to(tmp_path / "charts")
    monkeypatch.setattr("oliveflow.run_payloads.size_latency_chart", lambda result: pytest.fail("drawn again"))
    assert size_latency_png(pipeline_result) == first
    slower = pipeline_result.smoke.model_copy(update={"ttft_seconds": pipeline_result.smoke.ttft_seconds * 2})
    with pytest.raises(pytest.fail.Exception, match="drawn again"):  # other numbers: another chart
        size_latency_png(pipeline_result.model_copy(update={"smoke": slower}))


def test_logged_pyfunc_model_answers_prompts(tracked, mlflow_uri, pipeline_result, run_params):
    import mlflow

    model = mlflow.pyfunc.load_model(tracked.model_uri)
    questions = [json.loads(line)["prompt"] for line in (REPO_ROOT / "data" / "travel_eval.jsonl").open()][:2]
    answers = model.predict(questions, params={"max_new_tokens": run_params.smoke_test.max_new_tokens})
    # Same model, adapter, chat template and greedy decoding as the smoke test: the same answers.
    assert answers == [s.finetuned_answer for s in pipeline_result.samples]
    framed = model.predict(pd.DataFrame({"prompt": questions[:1]}), params={"max_new_tokens": 4})
    assert len(framed) == 1 and isinstance(framed[0], str)


def test_a_rerun_of_the_same_model_links_the_logged_model_instead_of_copying_it(tracked, mlflow_uri, pipeline_result,
                                                                              lineage, run_params):
    again = track_run(pipeline_result, run_params, lineage, tracked.experiment_name)
    assert again.run_id != tracked.run_id and again.model_uri == tracked.model_uri
    outputs = _client(mlflow_uri).get_run(again.run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [tracked.model_uri.removeprefix("models:/")]


def test_default_store_tracks_and_registers_without_touching_the_working_folder(
        monkeypatch, tmp_path, empty_mlflow_db, pipeline_result, lineage, run_params):
    import mlflow

    from oliveflow.config import RegistryConfig
    from oliveflow.mlflow_store import using_tracking_uri
    from oliveflow.registry import make_registry, register_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OLIVEFLOW_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "mlflow").mkdir(parents=True)
    shutil.copyfile(empty_mlflow_db, tmp_path / "home" / "mlflow" / "mlflow.db")  # skips MLflow's migrations
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    tracked = track_run(pipeline_result, run_params, lineage, "default-store")
    assert tracked.tracking_uri == default_tracking_uri()
    outcome = register_model(make_registry(RegistryConfig()), "default-store", pipeline_result, tracked, lineage)
    assert outcome.registered and outcome.version.version == "1"
    with using_tracking_uri(default_tracking_uri()):
        assert mlflow.pyfunc.load_model("models:/default-store/1").predict(["Hi"], params={"max_new_tokens": 2})
    assert list(work.iterdir()) == [], "nothing lands in ./mlflow.db or ./mlruns"
    assert "MLFLOW_TRACKING_URI" not in os.environ, "the global URI was put back"


def test_a_tracking_server_that_is_down_fails_in_one_line(monkeypatch, pipeline_result, lineage, run_params):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(TrackingError) as failure:
        track_run(pipeline_result, run_params, lineage, "down")
    message = str(failure.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message and "did not answer after 3 tries" in message


class _HealthyButBroken(BaseHTTPRequestHandler):
    """Answers /health but fails every API call, like a server whose database went away."""

    api_calls = 0

    def log_message(self, *args):
        pass

    def do_GET(self):
        if not self.path.startswith("/health"):
            type(self).api_calls += 1
        self.send_response(200 if self.path.startswith("/health") else 503)
        self.end_headers()
        self.wfile.write(b"OK")

    do_POST = do_GET


def test_a_server_failing_mid_run_fails_clearly_after_few_retries(monkeypatch, pipeline_result, lineage, run_params):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HealthyButBroken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
        _HealthyButBroken.api_calls = 0
        with pytest.raises(TrackingError) as failure:
            track_run(pipeline_result, run_params, lineage, "broken")
    finally:
        server.shutdown()
        server.server_close()
    assert "\n" not in str(failure.value) and "logging to http://127.0.0.1" in str(failure.value)
    # MLflow retries a call 7 times by default; capped (HTTP_LIMITS: 2 retries) the failing call is made 3 times.
    assert 1 <= _HealthyButBroken.api_calls <= 4, f"{_HealthyButBroken.api_calls} API calls: retries not capped"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ, "the cap is scoped to the call"


# ---- a damaged local store: one line naming it, never retried ----

def _damage(db: Path, how: str, template: Path) -> None:
    import sqlite3

    if how == "garbage":
        db.write_bytes(os.urandom(64 * 1024))
    elif how == "not-mlflow":  # a valid SQLite database of something else
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE notes (body TEXT)")
            con.execute("INSERT INTO notes VALUES ('mine')")
    else:  # an MLflow store cut short, as by a full disk or an interrupted copy
        data = template.read_bytes()
        db.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how", ["garbage", "not-mlflow", "truncated"])
def test_a_damaged_store_is_one_line_naming_it_and_is_not_retried(how, monkeypatch, tmp_path, empty_mlflow_db,
                                                                  pipeline_result, lineage, run_params):
    from prefect.states import Failed

    from tasks.publish import _tracking_failed

    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    _damage(db, how, empty_mlflow_db)
    before = db.read_bytes()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with pytest.raises(CorruptStoreError) as failure:
        track_run(pipeline_result, run_params, lineage, "damaged")
    message = str(failure.value)
    assert "\n" not in message and message.startswith(f"MLflow store {db} ")
    assert f"mv {db} {db}.damaged" in message and "MLFLOW_TRACKING_URI" in message
    assert ("not an MLflow store (tables: notes)" if how == "not-mlflow" else "is damaged (SQLITE_") in message
    assert db.read_bytes() == before, "left as it was for a person to look at (MLflow added no tables)"
    assert _tracking_failed(None, None, Failed(data=failure.value)) is False, "the flow does not retry it"
    assert _tracking_failed(None, None, Failed(data=TrackingError("down"))) is True


def test_a_store_damaged_after_first_use_is_one_line_too(fresh_mlflow_uri, pipeline_result, lineage, run_params):
    track_run(pipeline_result, run_params, lineage, "then-damaged", log_model=False)
    db = Path(fresh_mlflow_uri.removeprefix("sqlite:///"))
    with db.open("r+b") as f:  # in place: the open store sees it on its next read
        f.write(os.urandom(db.stat().st_size))
    with pytest.raises(CorruptStoreError, match=r"is damaged \(SQLITE_NOTADB: file is not a database\); move it "
                                                r"aside"):
        track_run(pipeline_result, run_params, lineage, "then-damaged", log_model=False)


def test_a_new_store_is_made_under_a_lock_beside_it_once(tmp_path):
    """Four processes doing this at once: tests/reliability/test_services.py."""
    db = tmp_path / "new" / "mlflow.db"
    prepare_store(f"sqlite:///{db}")
    assert db.is_file() and (tmp_path / "new" / "mlflow.db.init.lock").exists()
    assert _client(f"sqlite:///{db}").search_experiments()[0].name == "Default", "created and migrated"
    db.write_bytes(b"not looked at again by this process")
    prepare_store(f"sqlite:///{db}")  # once per process: no lock, no check
