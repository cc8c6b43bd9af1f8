"""Real components for the deployment tests: a `prefect server` (SQLite) on a free port, the pools, limits and
deployments made by the documented command, and process workers polling them.

Every process started here is stopped by its pid (children first, also by pid). Prefect and oliveflow homes
live in the module's temp folder; the deployments default to a tiny model and a few LoRA steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
FLOW = "oliveflow-pipeline"
# Small enough to keep each cold pipeline run to tens of seconds on 2 cores (awq, the default quantizer,
# scales with its calibration samples).
FAST = {"quantize": {"calibration_blocks": 8},
        "finetune": {"max_steps": 2, "batch_size": 2, "max_seq_len": 64},
        "smoke_test": {"num_samples": 1, "max_new_tokens": 8}}
ARTIFACT_STORE = "az://oliveflow-artifacts/team"  # on Azurite, through adlfs
RESULT_STORAGE = "az://prefect-results/oliveflow"  # an AzureBlobStorageContainer block (prefect-azure)


def dotted(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += dotted(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


class Processes:
    """Starts background processes and stops exactly those (and their children) by pid."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.started.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, *procs: subprocess.Popen, timeout: float = 10) -> None:
        """SIGTERM each process and the children it spawned (flow runs), by pid; SIGKILL what outlives it."""
        pids = []
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                pids += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            pids.append(proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    os.kill(pid, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.started = [(n, p) for n, p in self.started if p not in procs]

    def stop_all(self) -> None:
        self.stop(*[proc for _, proc in self.started])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, processes: Processes, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}:\n{processes.log('server')[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout}s:\n{processes.log('server')[-3000:]}")


class Stack:
    """What the tests talk to: the server's URLs, the environment every component shares, the workers."""

    def __init__(self, root: Path, processes: Processes, port: int, blob_connection_string: str):
        self.root = root
        self.processes = processes
        self.url = f"http://127.0.0.1:{port}"
        self.api_url = f"{self.url}/api"
        self.oliveflow_home = root / "oliveflow"
        # "The data location" the deployments are configured with: a container on the shared blob storage.
        self.data_url = "az://oliveflow-data/travel"
        self.artifact_store, self.result_storage = ARTIFACT_STORE, RESULT_STORAGE
        self.deployment_ids: dict[str, str] = {}
        self.default_params: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.prefect = PREFECT
        base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env = {**base,
                    "PREFECT_HOME": str(root / "prefect"), "PREFECT_API_URL": self.api_url,
                    "PREFECT_UI_API_URL": self.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2",
                    "PREFECT_CLI_WRAP_LINES": "false", "COLUMNS": "240",
                    "OLIVEFLOW_HOME": str(self.oliveflow_home), "OLIVE_DISABLE_TELEMETRY": "1",
                    # What several hosts share: blob storage (Azurite) for the artifact store and Prefect's
                    # results, one MLflow store, one lock folder (file locks: one machine).
                    "AZURE_STORAGE_CONNECTION_STRING": blob_connection_string,
                    "MLFLOW_TRACKING_URI": f"sqlite:///{self.oliveflow_home / 'mlflow' / 'mlflow.db'}",
                    "OLIVEFLOW_LOCK_DIR": str(self.oliveflow_home / "locks"),
                    "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}

    def run(self, *argv: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(argv), env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(argv[:4])}... exited {done.returncode}:\n"
                        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def start_worker(self, pool: str, name: str, limit: int | None = None,
                     env: dict[str, str] | None = None) -> subprocess.Popen:
        argv = [PREFECT, "worker", "start", "--pool", pool, "--name", name, "--type", "process"]
        if limit:
            argv += ["--limit", str(limit)]
        return self.processes.start(name, argv, {**self.env, **(env or {})})

    def put_data(self, name: str, data: bytes) -> None:
        """Write a data file at the data location (what the team's data pipeline does each week)."""
        from azure.storage.blob import BlobServiceClient

        container, prefix = self.data_url.removeprefix("az://").split("/", 1)
        service = BlobServiceClient.from_connection_string(self.env["AZURE_STORAGE_CONNECTION_STRING"])
        if not service.get_container_client(container).exists():
            service.create_container(container)
        service.get_blob_client(container, f"{prefix}/{name}").upload_blob(data, overwrite=True)

    def store(self):
        """The shared artifact store as one more host sees it (its copy under the stack's folder)."""
        from unittest import mock

        from oliveflow.store import ArtifactStore

        with mock.patch.dict(os.environ, {"AZURE_STORAGE_CONNECTION_STRING":
                                          self.env["AZURE_STORAGE_CONNECTION_STRING"]}):
            return ArtifactStore(self.artifact_store, cache_dir=self.root / "test-copy")

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # Other test folders may have entered a Prefect test harness for the session: point at our server.
        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            with get_client(sync_client=True) as client:
                yield client

    def params(self, **changes: Any) -> dict[str, Any]:
        """The deployments' default `params` with changes (``finetune__max_steps=3`` sets finetune.max_steps)."""
        merged = json.loads(json.dumps(self.default_params))
        for dotted_key, value in changes.items():
            *parents, leaf = dotted_key.split("__")
            tree = merged
            for part in parents:
                tree = tree.setdefault(part, {})
            tree[leaf] = value
        return merged

    def submit(self, deployment: str, params: dict[str, Any] | None = None) -> str:
        """A flow run from a deployment, as the scheduler or the CLI makes it (state Scheduled, due now)."""
        from uuid import UUID

        with self.client() as client:
            run = client.create_flow_run_from_deployment(
                UUID(self.deployment_ids[deployment]), parameters=None if params is None else {"params": params})
        return str(run.id)

    def flow_run_ids(self, deployment: str) -> set[str]:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from uuid import UUID

        with self.client() as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[UUID(self.deployment_ids[deployment])])))
        return {str(r.id) for r in runs}

    def make_scheduled_run_due(self, deployment: str, timeout: float = 90) -> Any:
        """The earliest run the server's scheduler created for ``deployment``, moved to now (as if its time came).

        It carries what the scheduler gave it: the deployment's parameters, with its data location.
        """
        from prefect.client.schemas.filters import (
            DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName,
        )
        from prefect.client.schemas.sorting import FlowRunSort
        from prefect.states import Scheduled
        from prefect.types._datetime import now
        from uuid import UUID

        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(
                        any_=[UUID(self.deployment_ids[deployment])])),
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Scheduled"]))),
                    sort=FlowRunSort.EXPECTED_START_TIME_ASC)
                runs = [r for r in runs if r.auto_scheduled]
                if runs:
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"the scheduler made no run of {deployment} in {timeout}s")
                time.sleep(1)
            run = runs[0]
            client.set_flow_run_state(run.id, Scheduled(scheduled_time=now("UTC")), force=True)
        return run

    def wait(self, flow_run_id: str, timeout: float = 600) -> Any:
        from uuid import UUID

        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                run = client.read_flow_run(UUID(flow_run_id))
                if run.state is not None and run.state.is_final():
                    return run
                time.sleep(1)
        pytest.fail(f"flow run {flow_run_id} not finished after {timeout}s; worker logs:\n"
                    + "\n".join(self.processes.log(n)[-2000:] for n, _ in self.processes.started if n != "server"))

    def task_runs(self, flow_run_id: str) -> dict[str, Any]:
        """The flow run's task runs by task name (validate_data, quantize, finetune, export, ...)."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from uuid import UUID

        with self.client() as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
        return {re.sub(r"-[0-9a-f]+$", "", r.name): r for r in runs}

    def summary(self, flow_run_id: str) -> str:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
        from uuid import UUID

        with self.client() as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["oliveflow-summary"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])))
        assert found, f"flow run {flow_run_id} published no oliveflow-summary artifact"
        return found[0].data

    def stage_caches(self, flow_run_id: str) -> dict[str, str]:
        """{stage: 'hit' | 'miss'} from the run's summary artifact table."""
        rows = re.findall(r"^\| (quantize|finetune|export|smoke_test) \| (hit|miss) \|", self.summary(flow_run_id),
                          flags=re.M)
        return dict(rows)

    def events(self, prefix: str) -> list[dict[str, Any]]:
        """Events whose name starts with ``prefix``, every page of them."""
        body = json.dumps({"filter": {"event": {"prefix": [prefix]}}, "limit": 50}).encode()
        request = urllib.request.Request(f"{self.api_url}/events/filter", data=body,
                                         headers={"content-type": "application/json"})
        events = []
        while request is not None:
            with urllib.request.urlopen(request, timeout=30) as response:
                page = json.load(response)
            events += page["events"]
            request = page.get("next_page")
        return events

    def limit_holds(self, limit: str) -> dict[str, tuple[str, str]]:
        """{flow run id: (acquired, released)} for a global concurrency limit, from the server's events."""
        holds: dict[str, dict[str, str]] = {}
        for event in self.events("prefect.concurrency-limit."):
            if event["resource"].get("prefect.resource.name") != limit:
                continue
            kind = event["event"].rsplit(".", 1)[-1]
            for related in event["related"]:
                if related.get("prefect.resource.role") == "flow-run":
                    run_id = related["prefect.resource.id"].rsplit(".", 1)[-1]
                    holds.setdefault(run_id, {})[kind] = event["occurred"]
        return {run: (h.get("acquired"), h.get("released")) for run, h in holds.items()}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir, azurite_http) -> Iterator[Stack]:
    """Server up, pools + limits + deployments created by `python -m deployments.deploy`, no workers yet."""
    root = tmp_path_factory.mktemp("deploy")
    logs = root / "logs"
    logs.mkdir()
    processes = Processes(logs)
    stack = Stack(root, processes, free_port(), azurite_http.connection_string)
    for name in ("travel_train.jsonl", "travel_eval.jsonl"):
        stack.put_data(name, (REPO / "data" / name).read_bytes())
    try:
        started = time.monotonic()
        server = processes.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1",
                                            "--port", stack.url.rsplit(":", 1)[1]], stack.env)
        wait_healthy(stack.api_url, server, processes)
        stack.timings["server_start_s"] = round(time.monotonic() - started, 1)

        defaults = {"model": str(tiny_model_dir), **FAST}
        started = time.monotonic()
        done = stack.run(sys.executable, "-m", "deployments.deploy",
                         "--train-data", f"{stack.data_url}/travel_train.jsonl",
                         "--eval-data", f"{stack.data_url}/travel_eval.jsonl",
                         "--artifact-store", ARTIFACT_STORE, "--result-storage", RESULT_STORAGE,
                         *[arg for item in dotted(defaults) for arg in ("--param", item)])
        stack.timings["deploy_s"] = round(time.monotonic() - started, 1)
        for line in done.stdout.splitlines():
            name, _, deployment_id = line.partition("\t")
            if name.startswith(f"{FLOW}/") and deployment_id:
                stack.deployment_ids[name.split("/", 1)[1]] = deployment_id.strip()
        with stack.client() as client:
            from uuid import UUID

            stack.default_params = client.read_deployment(UUID(stack.deployment_ids["gpu-0"])).parameters["params"]
        yield stack
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def gpu_workers(stack) -> list[subprocess.Popen]:
    """Two workers on the GPU pool (one run each at a time), as two hosts would run them."""
    workers = [stack.start_worker("oliveflow-gpu", f"gpu-worker-{i}", limit=1) for i in (1, 2)]
    yield workers
    stack.processes.stop(*workers)
