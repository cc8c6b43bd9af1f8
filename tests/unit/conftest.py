"""Fixtures for tracking and registration: a PipelineResult around `chain`, MLflow stores, Azure stand-ins."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from oliveflow.config import PipelineParams, SmokeTestConfig
from oliveflow.results import PipelineResult, SmokeReport, StageRun

SMOKE = SmokeTestConfig(num_samples=2, max_new_tokens=12)
PARAMS = PipelineParams(smoke_test=SMOKE)


@pytest.fixture(scope="session")
def run_params() -> PipelineParams:
    """The run's parameters (what the flow would be called with)."""
    return PARAMS


@pytest.fixture(scope="session")
def smoke_report(chain) -> SmokeReport:
    from oliveflow.stages.smoke_test import smoke_test

    return smoke_test(chain["onnx"], chain["base"], chain["data"], chain["template"], SMOKE)


@pytest.fixture(scope="session")
def pipeline_result(chain, smoke_report) -> PipelineResult:
    """What the flow returns for the chain: a real export and a real smoke test."""
    onnx = chain["onnx"]
    runs = (("quantize", "quantized", "miss", 6.5), ("finetune", "adapter", "hit", 0.2),
            ("export", "onnx", "miss", 3.1))
    stages = {name: StageRun(name=name, cache=cache, seconds=seconds, output_bytes=chain[key].artifact.size_bytes)
              for name, key, cache, seconds in runs}
    stages["smoke_test"] = StageRun(name="smoke_test", cache="miss", seconds=0.4)
    return PipelineResult(onnx_model_dir=onnx.model_dir, adapter_file=onnx.adapter_file, template=chain["template"],
                          size_reduction=smoke_report.size_reduction, samples=smoke_report.samples, stages=stages,
                          base_model=chain["base"], quantized=chain["quantized"], adapter=chain["adapter"], onnx=onnx,
                          smoke=smoke_report)


@pytest.fixture(scope="session")
def lineage(chain):
    from oliveflow.lineage import RunContext, current_lineage

    # As inside a Prefect flow run (the flow passes these in from prefect.runtime: tasks.publish.run_context).
    run = RunContext(flow_name="oliveflow-pipeline", flow_run_id="0f1e2d3c-run", flow_run_name="tidy-olive",
                     flow_run_url="http://127.0.0.1:4200/runs/flow-run/0f1e2d3c-run")
    return current_lineage(chain["data"], chain["base"], run)


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An initialized, empty MLflow SQLite database.

    Creating one runs MLflow's schema migrations (~6 s on 2 cores); copying it is instant.
    """
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def new_store(folder: Path, template: Path) -> str:
    """A fresh SQLite MLflow store in ``folder``; returns its tracking URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, folder / "mlflow.db")
    return f"sqlite:///{folder.resolve() / 'mlflow.db'}"


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory, empty_mlflow_db) -> str:
    """One store for the session's tracked run (tracking a run costs seconds)."""
    return new_store(tmp_path_factory.mktemp("mlflow-shared"), empty_mlflow_db)


@pytest.fixture(scope="session")
def tracked(pipeline_result, lineage, shared_store, run_params):
    from oliveflow.tracking import track_run

    return track_run(pipeline_result, run_params, lineage, "oliveflow-tests", uri=shared_store)


@pytest.fixture
def mlflow_uri(monkeypatch, shared_store) -> str:
    """MLFLOW_TRACKING_URI for this test: the shared store (its run and logged model live there)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_store)
    return shared_store


@pytest.fixture
def fresh_mlflow_uri(monkeypatch, tmp_path, empty_mlflow_db) -> str:
    """MLFLOW_TRACKING_URI for this test: a store of its own, empty."""
    uri = new_store(tmp_path / "mlflow", empty_mlflow_db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


# ---- Azure ML without Azure ----

class AzureStandIn:
    """A running ARM stand-in + Azurite, and a factory for MLClients pointed at them."""

    def __init__(self, arm, azurite, blobs, tls):
        self.arm, self.azurite, self.blobs, self.tls = arm, azurite, blobs, tls
        self._clouds = 0

    def ml_client(self, credential, workspace=None):
        from azure_standin import cloud_metadata

        from oliveflow.config import AzureWorkspace
        from oliveflow.registry_backends import azure_ml_client

        # The SDK keeps custom clouds in a module-level table and ignores a second definition
        # under the same name: one name per client keeps each bound to these ports.
        self._clouds += 1
        workspace = workspace or AzureWorkspace(subscription_id="sub-0000", resource_group="rg-oliveflow",
                                                workspace_name="ws-oliveflow")
        return azure_ml_client(workspace, credential, cloud=f"OliveflowStandIn{self.arm.port}x{self._clouds}",
                               cloud_metadata=cloud_metadata(self.arm.url, self.azurite.port))

    def blob_names(self) -> list[str]:
        from azure_standin import BLOB_CONTAINER

        return sorted(b.name for b in self.blobs.get_container_client(BLOB_CONTAINER).list_blobs())

    def blob_bytes(self, name: str) -> bytes:
        from azure_standin import BLOB_CONTAINER

        return self.blobs.get_blob_client(BLOB_CONTAINER, name).download_blob().readall()


@pytest.fixture(scope="module")
def azure(tmp_path_factory):
    """ARM stand-in and Azurite over TLS, started here and stopped by pid at the end of the module."""
    from azure_standin import BLOB_CONTAINER, ArmStandIn, localhost_subdomains, make_tls
    from services import ACCOUNT, ACCOUNT_KEY, STORAGE_SUFFIX, Azurite, azurite_binary, require

    binary = require(azurite_binary(), "Azurite not installed: run .ci/install-azurite.sh (npm install azurite "
                     "into $OLIVEFLOW_AZURITE_DIR, default ~/.cache/oliveflow-azurite)", ci_must_have=True)
    work = tmp_path_factory.mktemp("azure")
    tls = make_tls(work / "tls")
    had_cloud = os.environ.get("AZUREML_CURRENT_CLOUD")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REQUESTS_CA_BUNDLE", str(tls.ca))
        with localhost_subdomains(patch), Azurite(binary, work / "azurite", tls) as azurite:
            from azure.storage.blob import BlobServiceClient

            blobs = BlobServiceClient(azurite.account_url,
                                      credential={"account_name": ACCOUNT, "account_key": ACCOUNT_KEY})
            blobs.create_container(BLOB_CONTAINER)  # a workspace's storage comes with its container
            with ArmStandIn(tls, f"{STORAGE_SUFFIX}:{azurite.port}") as arm:
                yield AzureStandIn(arm, azurite, blobs, tls)
            pid = azurite.pid
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # Azurite is gone, not orphaned
    # MLClient writes the current cloud into os.environ; leave the process as we found it.
    if had_cloud is None:
        os.environ.pop("AZUREML_CURRENT_CLOUD", None)
    else:
        os.environ["AZUREML_CURRENT_CLOUD"] = had_cloud
