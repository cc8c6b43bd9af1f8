"""Registration: the quality gate, settings checks, MLflow Model Registry, and Azure ML without Azure."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
from pydantic import SecretStr

from oliveflow.config import (
    AzurePrincipal, AzureWorkspace, PipelineParams, RegistryConfig, check_registry_settings, registry_settings_errors,
)
from oliveflow.errors import InputError
from oliveflow.gate import Candidate, decide
from oliveflow.lineage import CONTENT_TAG
from oliveflow.mlflow_store import CorruptStoreError
from oliveflow.registry import make_registry, register_model
from oliveflow.registry_backends import (
    AzureMLRegistry, MlflowRegistry, RegisteredVersion, RegistryError, azure_credential,
)
from oliveflow.tracking import track_run

PLANTED = "planted-secret-XYZ"


def _champion(ppl: str | None, version: str = "3", rouge: str | None = None) -> RegisteredVersion:
    tags = {} if ppl is None else {"response_ppl_finetuned": ppl}
    if rouge is not None:
        tags["rouge_l_finetuned"] = rouge
    return RegisteredVersion(name="m", version=version, content_hash="c", tags=tags, uri=f"models:/m/{version}")


def _candidate(ppl, answered=True, rouge=0.3, losses=(3.0, 3.5, 2.5)) -> Candidate:
    return Candidate(eval_losses=(*losses, ppl), response_ppl=ppl, rouge_l=rouge, smoke_answered=answered)


def _variant(result, ppl: float | None = None, answered: bool | None = None, salt: str = "other", **adapter_changes):
    """The same files under another content hash (a retrained model), with other metrics."""
    onnx = result.onnx.model_copy(update={"artifact": result.onnx.artifact.model_copy(
        update={"sha256": hashlib.sha256((result.onnx.artifact.sha256 + salt).encode()).hexdigest()})})
    if ppl is not None:
        adapter_changes["response_ppl_finetuned"] = ppl
    adapter = result.adapter.model_copy(update=adapter_changes)
    smoke = result.smoke.model_copy(update={"answered": answered}) if answered is not None else result.smoke
    return result.model_copy(update={"onnx": onnx, "adapter": adapter, "smoke": smoke})


# ---- the gate ----

@pytest.mark.parametrize(("candidate", "champion", "force", "register", "words"), [
    (_candidate(20.0), None, False, True, "no version registered"),
    (_candidate(20.0, answered=False), None, False, False, "smoke test failed"),
    (_candidate(20.0), _champion("25"), False, True, "<= champion v3's 25.0000"),
    (_candidate(25.0), _champion("25"), False, True, "<="),
    (_candidate(26.0), _champion("25"), False, False, "26.0000 is worse than champion v3's 25.0000"),
    (_candidate(None), _champion("25"), False, False, "no finite response_ppl_finetuned"),
    (_candidate(26.0), _champion(None), False, True, "has no response_ppl_finetuned"),
    (_candidate(26.0), _champion("25"), True, True, "forced (the gate said: response_ppl_finetuned 26.0000 is worse"),
    # ROUGE-L, the second check: a better perplexity with clearly worse answers is refused.
    (_candidate(20.0, rouge=0.20), _champion("25", rouge="0.30"), False, False, "rouge_l_finetuned 0.2000 trails"),
    (_candidate(20.0, rouge=0.29), _champion("25", rouge="0.30"), False, True, "<= champion"),
    # Numerical failures are refused with no champion, and even when forced.
    (_candidate(float("nan")), None, False, False, "not finite"),
    (_candidate(float("inf")), None, True, False, "not finite"),
    (_candidate(20.0, losses=(3.0, float("nan"), 2.5)), None, False, False, "not finite"),
    (_candidate(20.0, answered=False), None, True, False, "smoke test failed"),
    # A champion's metric tag that is there but not a number (edited, damaged) is refused, not guessed at;
    # a missing one (above) just has nothing to beat.
    (_candidate(20.0), _champion("abc"), False, False,
     "champion m v3's tag response_ppl_finetuned is 'abc', not a number; set it to the version's value or remove "
     "it, or set registry.force to register anyway"),
    (_candidate(20.0), _champion("nan"), False, False, "response_ppl_finetuned is 'nan', not a number"),
    (_candidate(20.0), _champion("25", rouge=""), False, False, "rouge_l_finetuned is '', not a number"),
    (_candidate(20.0), _champion("abc"), True, True, "forced (the gate said: champion m v3's tag"),
])
def test_gate(candidate, champion, force, register, words):
    decision = decide(candidate, champion, force)
    assert decision.register is register and words in decision.reason


def test_gate_refuses_a_nan_model_with_no_champion(tracked, fresh_mlflow_uri, pipeline_result, lineage):
    registry = MlflowRegistry(fresh_mlflow_uri)
    broken = _variant(pipeline_result, salt="nan", eval_loss_finetuned=float("nan"),
                      response_ppl_finetuned=float("nan"))
    outcome = register_model(registry, "travel-nan", broken, tracked, lineage, force=True)
    assert not outcome.registered and "not finite" in outcome.summary
    assert registry.latest("travel-nan") is None


# ---- settings, checked before heavy work ----

def test_azure_settings_missing_are_listed(tmp_path):
    config = RegistryConfig(backend="azureml")
    errors = registry_settings_errors(config, environ={}, cwd=tmp_path)
    assert len(errors) == 1 and "\n" not in errors[0]
    for name, var in (("subscription_id", "AZURE_SUBSCRIPTION_ID"), ("resource_group", "AZURE_RESOURCE_GROUP"),
                      ("workspace_name", "AZUREML_WORKSPACE_NAME")):
        assert f"registry.azure.{name} (${var})" in errors[0]
    partial = registry_settings_errors(config, environ={"AZURE_SUBSCRIPTION_ID": "s", "AZURE_RESOURCE_GROUP": "g"},
                                       cwd=tmp_path)
    assert "workspace_name" in partial[0] and "subscription_id" not in partial[0]
    assert registry_settings_errors(RegistryConfig(backend="azureml", azure=AzureWorkspace(
        subscription_id="s", resource_group="g", workspace_name="w")), environ={}, cwd=tmp_path) == []
    assert registry_settings_errors(RegistryConfig(backend="mlflow"), environ={}, cwd=tmp_path) == []


def test_azure_settings_from_a_config_json(tmp_path):
    (tmp_path / ".azureml").mkdir()
    config_json = tmp_path / ".azureml" / "config.json"
    config_json.write_text(json.dumps({"subscription_id": "s", "resource_group": "g"}))
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    errors = registry_settings_errors(RegistryConfig(backend="azureml"), environ={}, cwd=nested)
    assert errors and "lacks workspace_name" in errors[0] and str(config_json) in errors[0]
    config_json.write_text(json.dumps({"subscription_id": "s", "resource_group": "g", "workspace_name": "w"}))
    assert registry_settings_errors(RegistryConfig(backend="azureml"), environ={}, cwd=nested) == []


def test_check_raises_one_actionable_line(monkeypatch, tmp_path):
    for var in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"registry azureml: missing registry.azure.subscription_id"):
        check_registry_settings(RegistryConfig(backend="azureml"))
    with pytest.raises(InputError, match="missing"):
        make_registry(RegistryConfig(backend="azureml"))  # fails before any client or network
    assert make_registry(RegistryConfig(backend="none")) is None


def test_model_name_is_checked_up_front():
    with pytest.raises(ValueError):
        RegistryConfig(model_name="no spaces allowed")


# ---- MLflow Model Registry ----

def test_mlflow_registration_is_idempotent_and_the_version_loads(tracked, mlflow_uri, pipeline_result, lineage):
    import mlflow

    registry = make_registry(RegistryConfig(backend="mlflow"))
    assert isinstance(registry, MlflowRegistry)
    first = register_model(registry, "travel-idem", pipeline_result, tracked, lineage)
    assert first.registered and not first.already_registered and first.version.version == "1"
    tags = first.version.tags
    assert tags[CONTENT_TAG] == pipeline_result.onnx.artifact.sha256 and tags["mlflow_run_id"] == tracked.run_id
    assert tags["data_sha256"] == lineage.data_sha256 and tags["response_ppl_finetuned"]
    assert tags.get("git_commit") == lineage.git_commit
    again = register_model(registry, "travel-idem", pipeline_result, tracked, lineage)
    assert again.already_registered and again.version.version == "1"
    assert again.summary.startswith("already registered as travel-idem v1")
    from mlflow import MlflowClient

    assert len(MlflowClient(registry_uri=mlflow_uri).search_model_versions("name = 'travel-idem'")) == 1
    answers = mlflow.pyfunc.load_model("models:/travel-idem/1").predict(["Any tips for Kyoto?"],
                                                                         params={"max_new_tokens": 3})
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_mlflow_gate_and_explicit_versions(tracked, mlflow_uri, pipeline_result, lineage):
    registry = MlflowRegistry(mlflow_uri)
    champion_ppl = pipeline_result.adapter.response_ppl_finetuned
    assert register_model(registry, "travel-gate", pipeline_result, tracked, lineage).version.version == "1"
    worse = _variant(pipeline_result, ppl=champion_ppl + 0.5)
    refused = register_model(registry, "travel-gate", worse, tracked, lineage)
    assert not refused.registered and refused.version is None
    assert refused.summary.startswith("not registered: response_ppl_finetuned") and "worse than champion v1" in \
        refused.summary
    broken = _variant(pipeline_result, answered=False, salt="f")
    failed = register_model(registry, "travel-gate", broken, tracked, lineage)
    assert failed.summary == "not registered: the smoke test failed"
    with pytest.raises(RegistryError, match=r"travel-gate version 1 already holds another model"):
        register_model(registry, "travel-gate", worse, tracked, lineage, force=True, version="1")
    forced = register_model(registry, "travel-gate", worse, tracked, lineage, force=True)
    assert forced.registered and forced.version.version == "2" and forced.reason.startswith("forced")
    same_as_1 = register_model(registry, "travel-gate", pipeline_result, tracked, lineage, version="5")
    assert same_as_1.already_registered and same_as_1.version.version == "1"
    with pytest.raises(RegistryError, match="next version is 3, not 7"):
        register_model(registry, "travel-gate", _variant(pipeline_result, salt="x"), tracked, lineage, version="7")


# ---- Azure ML: TLS ARM stand-in + Azurite ----

def _principal(azure) -> AzurePrincipal:
    """A service principal as the entry point reads it from the environment (secret planted by the test)."""
    return AzurePrincipal.from_env({"AZURE_TENANT_ID": "tenant-0000", "AZURE_CLIENT_ID": "client-0000",
                                    "AZURE_CLIENT_SECRET": os.environ.get("AZURE_CLIENT_SECRET", PLANTED),
                                    "AZURE_AUTHORITY_HOST": azure.arm.url})


def _model_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_azure_registration_uploads_tags_and_is_idempotent(azure, tracked, pipeline_result, lineage):
    registry = AzureMLRegistry(azure.ml_client(azure_credential(_principal(azure))))
    arm = azure.arm.state
    puts_before = len(arm.calls("PUT", r"/models/travel-az/versions/"))
    first = register_model(registry, "travel-az", pipeline_result, tracked, lineage)
    assert first.registered and first.version.version == "1" and first.version.uri == "azureml:travel-az:1"
    assert arm.tokens_issued >= 1, "the service principal authenticated against the stand-in's token endpoint"

    (put,) = arm.calls("PUT", r"/models/travel-az/versions/1$")[puts_before:]
    assert put.headers["Authorization"] == "Bearer standin-token-from-entra"
    body = json.loads(put.body)["properties"]
    assert body["modelType"] == "custom_model"
    for where in (body["tags"], body["properties"]):
        assert where[CONTENT_TAG] == pipeline_result.onnx.artifact.sha256
        assert where["mlflow_run_id"] == tracked.run_id and where["data_sha256"] == lineage.data_sha256
        assert where["base_model_sha256"] == lineage.base_model_sha256
        assert float(where["eval_loss_finetuned"]) == pytest.approx(pipeline_result.adapter.eval_loss_finetuned, 1e-5)
        assert where.get("git_commit") == lineage.git_commit and where["flow_run_id"] == lineage.flow_run_id
    # The files really landed in blob storage, byte for byte, where modelUri points.
    prefix = body["modelUri"].split("/paths/", 1)[1].rstrip("/") + "/"
    assert prefix.startswith("LocalUpload/")
    local = _model_files(pipeline_result.onnx_model_dir)
    uploaded = {name[len(prefix):]: azure.blob_bytes(name) for name in azure.blob_names() if name.startswith(prefix)}
    assert uploaded.keys() == local.keys() and "model.onnx" in uploaded
    assert all(uploaded[name] == data for name, data in local.items())

    blobs = azure.blob_names()
    again = register_model(registry, "travel-az", pipeline_result, tracked, lineage)
    assert again.already_registered and again.version.version == "1"
    assert len(arm.calls("PUT", r"/models/travel-az/versions/")) == puts_before + 1, "no second model version PUT"
    assert azure.blob_names() == blobs, "nothing uploaded again"
    assert not arm.unexpected, f"the SDK called endpoints the stand-in does not emulate: {arm.unexpected}"


def test_azure_gate_and_version_conflict(azure, tracked, pipeline_result, lineage):
    from azure_standin import StaticToken

    registry = AzureMLRegistry(azure.ml_client(StaticToken()))
    arm = azure.arm.state
    assert register_model(registry, "travel-az-gate", pipeline_result, tracked, lineage, version="1").registered
    puts = len(arm.calls("PUT", r"/models/travel-az-gate/"))
    worse = _variant(pipeline_result, ppl=pipeline_result.adapter.response_ppl_finetuned + 1)
    refused = register_model(registry, "travel-az-gate", worse, tracked, lineage)
    assert refused.summary.startswith("not registered: response_ppl_finetuned") and "champion v1" in refused.summary
    with pytest.raises(RegistryError) as conflict:
        register_model(registry, "travel-az-gate", worse, tracked, lineage, force=True, version="1")
    assert "travel-az-gate version 1 already holds another model" in str(conflict.value)
    assert "\n" not in str(conflict.value)
    assert len(arm.calls("PUT", r"/models/travel-az-gate/")) == puts, "refusals make no request that writes"
    forced = register_model(registry, "travel-az-gate", worse, tracked, lineage, force=True)
    assert forced.version.version == "2" and registry.latest("travel-az-gate").version == "2"


def test_secrets_never_reach_outputs(azure, monkeypatch, fresh_mlflow_uri, caplog, capfd, pipeline_result, lineage):
    """Plant a secret in the environment and in a SecretStr parameter; scan everything a run writes."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AZURE_CLIENT_SECRET", PLANTED)
    store = Path(fresh_mlflow_uri.removeprefix("sqlite:///")).parent

    class ParamsWithSecret(PipelineParams):
        hub_token: SecretStr

    params = ParamsWithSecret(hub_token=SecretStr(PLANTED + "-param"))
    principal = AzurePrincipal.from_env({**os.environ, "AZURE_TENANT_ID": "tenant-0000",
                                         "AZURE_CLIENT_ID": "client-0000", "AZURE_AUTHORITY_HOST": azure.arm.url})
    tracked = track_run(pipeline_result, params, lineage, "secrets")
    registry = AzureMLRegistry(azure.ml_client(azure_credential(principal)))
    requests_before = len(azure.arm.state.requests)
    outcome = register_model(registry, "travel-secret", _variant(pipeline_result, salt="s"), tracked, lineage,
                             force=True)
    assert outcome.registered

    def to_entra(r) -> bool:  # the token endpoint is where the secret belongs
        return r.path.endswith("/oauth2/v2.0/token")

    token_calls = [r for r in azure.arm.state.requests[requests_before:] if to_entra(r)]
    assert token_calls and PLANTED in token_calls[0].body, "the planted secret was really used to authenticate"
    written = [*store.rglob("*"), *azure.azurite.data_dir.rglob("*")]  # MLflow store; blob storage
    outputs: dict[str, bytes] = {p.as_posix(): p.read_bytes() for p in written if p.is_file()}
    for i, r in enumerate(azure.arm.state.requests):
        if not to_entra(r):
            outputs[f"request {i} {r.method} {r.path}"] = json.dumps([r.path, r.query, r.headers, r.body]).encode()
    outputs["logs"] = caplog.text.encode()
    captured = capfd.readouterr()
    outputs["stdout+stderr"] = (captured.out + captured.err).encode()
    outputs["results"] = (tracked.model_dump_json() + outcome.model_dump_json() + repr(principal)
                          + params.model_dump_json()).encode()
    assert len(outputs) > 20
    leaks = [name for name, data in outputs.items() if PLANTED.encode() in data]
    assert not leaks, f"the planted secret leaked into: {leaks}"


@pytest.mark.live
@pytest.mark.skipif(not all(os.environ.get(v) for v in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP",
                                                            "AZUREML_WORKSPACE_NAME")),
                    reason="live Azure ML test: set AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, "
                           "AZUREML_WORKSPACE_NAME and a credential DefaultAzureCredential can find "
                           "(az login, managed identity, or AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET)")
def test_live_azure_ml_registration(tracked, pipeline_result, lineage):
    registry = make_registry(RegistryConfig(backend="azureml", model_name="oliveflow-live-test"),
                             principal=AzurePrincipal.from_env())
    first = register_model(registry, "oliveflow-live-test", pipeline_result, tracked, lineage, force=True)
    assert first.registered
    again = register_model(registry, "oliveflow-live-test", pipeline_result, tracked, lineage)
    assert again.already_registered and again.version.version == first.version.version


# ---- damaged entries and stores ----

def test_a_damaged_registry_entry_is_refused_naming_the_version(tracked, mlflow_uri, pipeline_result, lineage):
    from mlflow import MlflowClient

    registry = MlflowRegistry(mlflow_uri)
    assert register_model(registry, "travel-damaged", pipeline_result, tracked, lineage).version.version == "1"
    MlflowClient(registry_uri=mlflow_uri).set_model_version_tag("travel-damaged", "1", "response_ppl_finetuned",
                                                                "12,5")
    retrained = _variant(pipeline_result, salt="d")
    refused = register_model(registry, "travel-damaged", retrained, tracked, lineage)
    assert not refused.registered and "\n" not in refused.summary
    assert "champion travel-damaged v1's tag response_ppl_finetuned is '12,5', not a number" in refused.summary
    forced = register_model(registry, "travel-damaged", retrained, tracked, lineage, force=True)
    assert forced.version.version == "2" and forced.reason.startswith("forced")


@pytest.mark.parametrize("when", ["before first use", "after first use"])
def test_a_damaged_mlflow_store_fails_the_registry_in_one_line(when, fresh_mlflow_uri):
    db = Path(fresh_mlflow_uri.removeprefix("sqlite:///"))
    if when == "before first use":
        db.write_bytes(os.urandom(32 * 1024))
        with pytest.raises(CorruptStoreError) as failure:
            MlflowRegistry(fresh_mlflow_uri)
    else:
        registry = MlflowRegistry(fresh_mlflow_uri)
        assert registry.existing("travel", "0" * 64) is None
        with db.open("r+b") as f:
            f.write(os.urandom(db.stat().st_size))
        with pytest.raises(CorruptStoreError) as failure:
            registry.existing("travel", "0" * 64)
    message = str(failure.value)
    assert "\n" not in message and message.startswith(f"MLflow store {db} is damaged (SQLITE_NOTADB")
    assert f"mv {db} {db}.damaged" in message
