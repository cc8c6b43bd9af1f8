"""Services that fail, and a store opened by four processes at once: real processes, servers and sockets, no mocks.

Part of the reliability issue (concurrency, transient failures). The faults come from ``FaultProxy``, a
real HTTP proxy on a socket in front of a real ``mlflow server``, the Azure ML ARM stand-in and Azurite:
it forwards each request, or answers 503 itself, or closes the connection without forwarding, or
forwards and then closes without the answer (the service acted, the client never heard). Backoff is
kept short here through the registries' ``backoff`` parameter; no test asserts a duration.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from oliveflow.lineage import CONTENT_TAG, Lineage
from oliveflow.mlflow_store import Backoff, TrackingError, check_tracking
from oliveflow.registry import register_model
from oliveflow.registry_backends import AzureMLRegistry, MlflowRegistry, RegistryError, azure_ml_client
from oliveflow.tracking import track_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # azure_standin lives with the unit tests

QUICK = Backoff(attempts=3, first=0.05)
LINEAGE = Lineage(flow_name="reliability", flow_run_name="faults")


# ---- a proxy that injects faults ----

@dataclass
class Fault:
    """The first ``times`` requests (all when None) whose method is ``method`` and path matches ``path`` meet
    ``fate``: an HTTP status the proxy answers itself ("503"), "drop" (closed, nothing forwarded) or
    "lose-answer" (forwarded, then closed before the answer)."""

    method: str
    path: str
    fate: str
    times: int | None = None
    met: int = 0

    def applies(self, method: str, path: str) -> bool:
        if method != self.method or not re.search(self.path, path) or (self.times is not None and
                                                                       self.met >= self.times):
            return False
        self.met += 1
        return True


def _read_until(conn: socket.socket, data: bytes, done) -> bytes:
    while not done(data):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("the peer closed the connection mid-message")
        data += chunk
    return data


def _chunked_end(body: bytes) -> bool:
    pos = 0
    while (end := body.find(b"\r\n", pos)) >= 0:
        size = int(body[pos:end].split(b";")[0], 16)
        if size == 0:
            return body.endswith(b"\r\n\r\n")
        pos = end + 2 + size + 2
    return False


def _closing(head: bytes) -> bytes:
    """The head with ``Connection: close``: one request per connection keeps the proxy simple."""
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith((b"connection:", b"keep-alive:"))]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


class FaultProxy:
    """An HTTP(S) proxy on a free port in front of ``127.0.0.1:upstream_port``; ``faults`` say which requests fail.

    With ``tls`` it terminates TLS with the test certificate and speaks TLS to the upstream (as
    ``upstream_name``). ``log`` lists (method, path, fate) of every request, in order.
    """

    def __init__(self, upstream_port: int, faults: list[Fault] | None = None, tls=None,
                 upstream_name: str = "localhost"):
        self.upstream_port, self.tls, self.upstream_name = upstream_port, tls, upstream_name
        self.faults = list(faults or [])
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fates(self, method: str, pattern: str) -> list[str]:
        with self._lock:
            return [fate for m, path, fate in self.log if m == method and re.search(pattern, path)]

    def _fate(self, method: str, path: str) -> str:
        with self._lock:
            fate = next((f.fate for f in self.faults if f.applies(method, path)), "forward")
            self.log.append((method, path, fate))
        return fate

    def _upstream(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=120)
        if self.tls is None:
            return sock
        return ssl.create_default_context(cafile=str(self.tls.ca)).wrap_socket(sock,
                                                                                server_hostname=self.upstream_name)

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(str(self.tls.cert), str(self.tls.key))
                conn = context.wrap_socket(conn, server_side=True)
            data = _read_until(conn, b"", lambda d: b"\r\n\r\n" in d)
            head, _, body = data.partition(b"\r\n\r\n")
            method, path = head.split(b" ", 2)[:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.decode("latin-1").partition(":") for line in head.split(b"\r\n")[1:])}
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = _read_until(conn, body, _chunked_end)
            else:
                length = int(headers.get("content-length") or 0)
                body = _read_until(conn, body, lambda d: len(d) >= length)
            fate = self._fate(method.decode(), path.decode())
            if fate == "drop":
                return
            if fate.isdigit():
                text = f"injected by FaultProxy: {fate}".encode()
                conn.sendall(f"HTTP/1.1 {fate} Injected\r\nContent-Type: text/plain\r\nContent-Length: {len(text)}"
                             "\r\nConnection: close\r\n\r\n".encode() + text)
                return
            with self._upstream() as upstream:
                upstream.sendall(_closing(head) + body)
                answer = b""
                while chunk := upstream.recv(65536):
                    answer += chunk
            if fate == "lose-answer":
                return
            answer_head, _, answer_body = answer.partition(b"\r\n\r\n")
            conn.sendall(_closing(answer_head) + answer_body)
        except (OSError, ValueError):
            pass  # a client that went away, or TLS refused: nothing to answer
        finally:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


# ---- a real MLflow server ----

class MlflowServer:
    """``mlflow server`` on a free port over a SQLite store, in a process group of its own (it starts a
    uvicorn child), stopped by that group's id."""

    def __init__(self, workdir: Path):
        from services import free_port

        workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.workdir, self.log = free_port(), workdir, workdir / "mlflow-server.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> MlflowServer:
        command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                   str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
                   "--artifacts-destination", str(self.workdir / "artifacts")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        with open(self.log, "wb") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
        deadline = time.monotonic() + 180  # migrations and uvicorn's start: ~20 s on 2 idle cores
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._process.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"mlflow server did not answer within 180 s: {self.log.read_text()[-2000:]}")

    def __exit__(self, *exc) -> None:
        if self._process is None:
            return
        group = self._process.pid  # start_new_session: the group id is the server's pid
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self._process.poll()  # reaps the server; its uvicorn child is reaped by init
                if not _group_alive(group):
                    return
                time.sleep(0.1)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    with server:
        yield server
    assert not _group_alive(server._process.pid), "the server and its uvicorn child are gone, not orphaned"


@pytest.fixture(scope="module")
def result(chain):
    """A PipelineResult of the session's tiny chain, with a real smoke test (the unit tests' fixture, briefer)."""
    from oliveflow.config import SmokeTestConfig
    from oliveflow.results import PipelineResult
    from oliveflow.stages.smoke_test import smoke_test

    smoke = smoke_test(chain["onnx"], chain["base"], chain["data"], chain["template"],
                       SmokeTestConfig(num_samples=1, max_new_tokens=4))
    onnx = chain["onnx"]
    return PipelineResult(onnx_model_dir=onnx.model_dir, adapter_file=onnx.adapter_file, template=chain["template"],
                          size_reduction=smoke.size_reduction, samples=smoke.samples, stages={},
                          base_model=chain["base"], quantized=chain["quantized"], adapter=chain["adapter"], onnx=onnx,
                          smoke=smoke)


def _variant(result, salt: str):
    """The same model under another content hash, as a retrained one would be."""
    import hashlib

    artifact = result.onnx.artifact.model_copy(update={"sha256": hashlib.sha256(salt.encode()).hexdigest()})
    return result.model_copy(update={"onnx": result.onnx.model_copy(update={"artifact": artifact})})


# ---- four processes, one new local store ----

def _open_and_log(uri: str, via: str, barrier, answers) -> None:
    """One process: open the new store first through tracking or the registry, log a run, register a model."""
    try:
        from mlflow import MlflowClient

        barrier.wait(timeout=300)
        if via == "registry":
            registry = MlflowRegistry(uri)
        else:
            check_tracking(uri)
            registry = None
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        run = client.create_run("0", run_name=f"{via}-{os.getpid()}")
        client.log_metric(run.info.run_id, "loss", 1.0)
        client.set_terminated(run.info.run_id)
        model = client.create_logged_model("0")
        registry = registry or MlflowRegistry(uri)
        barrier.wait(timeout=300)  # and all register the same model at once, as identical runs finishing together
        with registry.exclusive("concurrent"):  # as register_model does, less the gate
            version = registry.existing("concurrent", "same-content") or registry.create_once(
                "concurrent", Path("."), "same-content", {"mlflow_run_id": run.info.run_id}, None,
                f"models:/{model.model_id}")
        answers.put((via, "ok", version.version))
    except BaseException as exc:  # reported to the test, which names it
        answers.put((via, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", None))


def test_four_processes_opening_a_new_store_together_all_succeed(tmp_path):
    """MLflow migrates a new SQLite store on first open, unlocked; without oliveflow's lock three of four fail
    ("duplicate column name: step", "table runs already exists")."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    context = multiprocessing.get_context("spawn")  # fresh interpreters, as four `oliveflow run`s are
    barrier, answers = context.Barrier(4), context.Queue()
    vias = ["tracking", "registry", "tracking", "registry"]
    procs = [context.Process(target=_open_and_log, args=(uri, via, barrier, answers)) for via in vias]
    for proc in procs:
        proc.start()
    try:
        got = [answers.get(timeout=600) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()  # by pid: only the processes this test started
                proc.join(timeout=10)
    failures = [a for a in got if a[1] != "ok"]
    assert not failures, failures
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert len(client.search_runs(["0"])) == 4
    versions = client.search_model_versions("name = 'concurrent'")
    assert len(versions) == 1 and {a[2] for a in got} == {"1"}, "the same content is registered once, not per run"
    assert (tmp_path / "mlflow" / "mlflow.db.init.lock").exists(), "the lock sits beside the database"


# ---- MLflow server: down, 5xx, lost answers ----

def test_a_tracking_server_answering_503_is_retried_with_backoff(mlflow_server):
    with FaultProxy(mlflow_server.port, [Fault("GET", r"^/health", "503", times=2)]) as proxy:
        check_tracking(f"http://127.0.0.1:{proxy.port}", backoff=0.05)
    assert proxy.fates("GET", "^/health") == ["503", "503", "forward"]


@pytest.mark.parametrize("fate", ["503", "drop"])
def test_a_tracking_server_that_stays_down_is_one_line_after_the_last_try(mlflow_server, fate):
    with FaultProxy(mlflow_server.port, [Fault("GET", r"^/health", fate)]) as proxy:
        uri = f"http://127.0.0.1:{proxy.port}"
        with pytest.raises(TrackingError) as failure:
            check_tracking(uri, backoff=0.05)
    message = str(failure.value)
    assert "\n" not in message and uri in message and "did not answer after 3 tries" in message
    assert "MLFLOW_TRACKING_URI" in message
    assert proxy.fates("GET", "^/health") == [fate] * 3


def test_tracking_rides_out_5xx_mid_run(mlflow_server, result, run_params_quick):
    # MLflow's own retries (HTTP_LIMITS: 2 more tries, backoff factor 1) cover each request of a run.
    faults = [Fault("POST", r"/runs/log-batch", "503", times=2), Fault("POST", r"/runs/create", "drop", times=1)]
    with FaultProxy(mlflow_server.port, faults) as proxy:
        tracked = track_run(result, run_params_quick, LINEAGE, "faults", log_model=False,
                            uri=f"http://127.0.0.1:{proxy.port}")
    assert proxy.fates("POST", r"/runs/log-batch")[:3] == ["503", "503", "forward"]
    run = mlflow_server.client().get_run(tracked.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["size.reduction"] == pytest.approx(result.size_reduction)


@pytest.fixture(scope="module")
def run_params_quick():
    from oliveflow.config import PipelineParams

    return PipelineParams()


@pytest.fixture(scope="module")
def tracked_on_server(mlflow_server, result, run_params_quick):
    """The run and its pyfunc model, logged to the server directly (no faults)."""
    return track_run(result, run_params_quick, LINEAGE, "registry-faults", uri=mlflow_server.url)


def _mlflow_versions(server: MlflowServer, name: str) -> list:
    return server.client().search_model_versions(f"name = '{name}'")


def test_a_create_whose_answer_was_lost_is_not_registered_twice(mlflow_server, result, tracked_on_server):
    """The server makes the version, the answer never arrives: the retry finds it by content hash.

    MLflow's client alone retries the POST (it retries every method) and makes version 2 of the same model.
    """
    with FaultProxy(mlflow_server.port, [Fault("POST", r"/model-versions/create$", "lose-answer", times=1)]) as proxy:
        registry = MlflowRegistry(f"http://127.0.0.1:{proxy.port}", backoff=QUICK)
        outcome = register_model(registry, "lost-answer", result, tracked_on_server, LINEAGE)
    assert outcome.registered and outcome.version.version == "1"
    assert proxy.fates("POST", r"/model-versions/create$") == ["lose-answer"], "no second create was sent"
    versions = _mlflow_versions(mlflow_server, "lost-answer")
    assert [v.version for v in versions] == ["1"]
    assert versions[0].tags[CONTENT_TAG] == result.onnx.artifact.sha256


def test_registry_5xx_and_dropped_connections_are_retried(mlflow_server, result, tracked_on_server):
    faults = [Fault("GET", r"/model-versions/search", "503", times=1),
              Fault("POST", r"/model-versions/create$", "drop", times=1)]
    with FaultProxy(mlflow_server.port, faults) as proxy:
        registry = MlflowRegistry(f"http://127.0.0.1:{proxy.port}", backoff=QUICK)
        outcome = register_model(registry, "flaky", _variant(result, "flaky"), tracked_on_server, LINEAGE)
        again = register_model(registry, "flaky", _variant(result, "flaky"), tracked_on_server, LINEAGE)
    assert outcome.registered and outcome.version.version == "1"
    assert again.already_registered and again.version.version == "1"
    assert proxy.fates("POST", r"/model-versions/create$") == ["drop", "forward"]
    assert [v.version for v in _mlflow_versions(mlflow_server, "flaky")] == ["1"]


def test_a_registry_that_stays_down_is_one_line_and_registers_nothing(mlflow_server, result, tracked_on_server):
    with FaultProxy(mlflow_server.port, [Fault("POST", r"/model-versions/create$", "503")]) as proxy:
        uri = f"http://127.0.0.1:{proxy.port}"
        with pytest.raises(RegistryError) as failure:
            register_model(MlflowRegistry(uri, backoff=QUICK), "down", _variant(result, "down"), tracked_on_server,
                           LINEAGE)
    message = str(failure.value)
    assert "\n" not in message and message.startswith("registry mlflow: registering down failed 3 times")
    assert uri in message and "re-run" in message
    assert proxy.fates("POST", r"/model-versions/create$") == ["503"] * 3, "MLflow's own retries were off"
    assert _mlflow_versions(mlflow_server, "down") == []


# ---- Azure ML: ARM stand-in and Azurite behind fault proxies ----

class AzureBehindProxies:
    """The ARM stand-in and Azurite (TLS), each reached only through a FaultProxy whose faults a test sets."""

    def __init__(self, arm, arm_proxy, blob_proxy, blobs):
        self.arm, self.arm_proxy, self.blob_proxy, self.blobs = arm, arm_proxy, blob_proxy, blobs
        self._clouds = 0

    def registry(self, faults_arm=(), faults_blob=()) -> AzureMLRegistry:
        from azure_standin import StaticToken, cloud_metadata

        from oliveflow.config import AzureWorkspace

        for proxy, faults in ((self.arm_proxy, faults_arm), (self.blob_proxy, faults_blob)):
            proxy.faults[:] = list(faults)
            proxy.log.clear()  # each test reads what its own registration sent
        self._clouds += 1  # the SDK ignores a second definition of a custom cloud name
        client = azure_ml_client(AzureWorkspace(subscription_id="sub-0000", resource_group="rg-oliveflow",
                                                workspace_name="ws-oliveflow"), StaticToken(),
                                 cloud=f"OliveflowFaults{self.arm_proxy.port}x{self._clouds}",
                                 cloud_metadata=cloud_metadata(f"https://localhost:{self.arm_proxy.port}/",
                                                               self.blob_proxy.port))
        return AzureMLRegistry(client, backoff=QUICK)

    def versions(self, name: str) -> list[str]:
        return sorted(self.arm.state.models.get(name, {}))

    def uploaded(self, put_body: str) -> dict[str, bytes]:
        from azure_standin import BLOB_CONTAINER

        prefix = json.loads(put_body)["properties"]["modelUri"].split("/paths/", 1)[1].rstrip("/") + "/"
        container = self.blobs.get_container_client(BLOB_CONTAINER)
        return {b.name[len(prefix):]: container.get_blob_client(b.name).download_blob().readall()
                for b in container.list_blobs(name_starts_with=prefix)}


@pytest.fixture(scope="module")
def azure_faults(tmp_path_factory):
    from azure.storage.blob import BlobServiceClient
    from azure_standin import BLOB_CONTAINER, ArmStandIn, localhost_subdomains, make_tls
    from services import ACCOUNT, ACCOUNT_KEY, STORAGE_SUFFIX, Azurite, azurite_binary, require

    binary = require(azurite_binary(), "Azurite not installed: run .ci/install-azurite.sh (npm install azurite "
                     "into $OLIVEFLOW_AZURITE_DIR, default ~/.cache/oliveflow-azurite)", ci_must_have=True)
    work = tmp_path_factory.mktemp("azure-faults")
    tls = make_tls(work / "tls")
    had_cloud = os.environ.get("AZUREML_CURRENT_CLOUD")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REQUESTS_CA_BUNDLE", str(tls.ca))
        with localhost_subdomains(patch), Azurite(binary, work / "azurite", tls) as azurite, \
                FaultProxy(azurite.port, tls=tls, upstream_name=f"{ACCOUNT}.blob.{STORAGE_SUFFIX}") as blob_proxy:
            blobs = BlobServiceClient(azurite.account_url,
                                      credential={"account_name": ACCOUNT, "account_key": ACCOUNT_KEY})
            blobs.create_container(BLOB_CONTAINER)
            # The workspace's datastore names the blob proxy as its storage endpoint: uploads go through it.
            with ArmStandIn(tls, f"{STORAGE_SUFFIX}:{blob_proxy.port}") as arm, \
                    FaultProxy(arm.port, tls=tls) as arm_proxy:
                yield AzureBehindProxies(arm, arm_proxy, blob_proxy, blobs)
    if had_cloud is None:  # MLClient writes the current cloud into os.environ
        os.environ.pop("AZUREML_CURRENT_CLOUD", None)
    else:
        os.environ["AZUREML_CURRENT_CLOUD"] = had_cloud


_VERSION_PUT = r"/models/{}/versions/[^/]+$"


def test_azure_lost_answers_to_the_version_put_register_once(azure_faults, result):
    """Every PUT of the first try (the SDK's own 3) makes version 1 and loses its answer: the registry's
    retry looks the content hash up and finds version 1, where another create would have made version 2."""
    name = "az-lost"
    registry = azure_faults.registry(faults_arm=[Fault("PUT", _VERSION_PUT.format(name), "lose-answer", times=3)])
    outcome = register_model(registry, name, _variant(result, name), None, LINEAGE)
    assert outcome.registered and outcome.version.version == "1"
    assert azure_faults.versions(name) == ["1"]
    assert azure_faults.arm_proxy.fates("PUT", _VERSION_PUT.format(name)) == ["lose-answer"] * 3, \
        "no fourth PUT: the retry found the version instead of creating one"


def test_azure_5xx_is_retried_then_registers(azure_faults, result):
    name = "az-503"
    faults = [Fault("GET", rf"/models/{name}/versions$", "503", times=1),
              Fault("PUT", _VERSION_PUT.format(name), "503", times=2)]
    outcome = register_model(azure_faults.registry(faults_arm=faults), name, _variant(result, name), None, LINEAGE)
    assert outcome.registered and azure_faults.versions(name) == ["1"]
    assert azure_faults.arm_proxy.fates("PUT", _VERSION_PUT.format(name)) == ["503", "503", "forward"]


def test_azure_blob_requests_that_never_answer_are_retried_and_the_upload_is_complete(azure_faults, result,
                                                                                      tmp_path):
    """The first two blob uploads get no answer (a timeout, seen from the client); the model still lands whole."""
    import shutil

    name = "az-blob"
    folder = tmp_path / "model"
    shutil.copytree(result.onnx_model_dir, folder)
    (folder / "NOTE.txt").write_text(name)  # new content: the SDK skips uploading a folder it uploaded before
    variant = _variant(result, name).model_copy(update={"onnx_model_dir": folder})
    registry = azure_faults.registry(faults_blob=[Fault("PUT", r"/LocalUpload/", "drop", times=2)])
    outcome = register_model(registry, name, variant, None, LINEAGE)
    assert outcome.registered and azure_faults.versions(name) == ["1"]
    assert azure_faults.blob_proxy.fates("PUT", r"/LocalUpload/")[:2] == ["drop", "drop"]
    (put,) = [r for r in azure_faults.arm.state.calls("PUT", _VERSION_PUT.format(name))]
    local = {p.relative_to(variant.onnx_model_dir).as_posix(): p.read_bytes()
             for p in variant.onnx_model_dir.rglob("*") if p.is_file()}
    assert azure_faults.uploaded(put.body) == local


def test_azure_that_stays_down_is_one_line_and_registers_nothing(azure_faults, result):
    name = "az-down"
    registry = azure_faults.registry(faults_arm=[Fault("PUT", _VERSION_PUT.format(name), "503")])
    with pytest.raises(RegistryError) as failure:
        register_model(registry, name, _variant(result, name), None, LINEAGE)
    message = str(failure.value)
    assert "\n" not in message and message.startswith(f"registry azureml: registering {name} failed 3 times")
    assert "re-run" in message and "never registered twice" in message
    assert azure_faults.versions(name) == []
    # Each of the 3 tries: the SDK's own bounded retries of the PUT (AZURE_HTTP_LIMITS: 2 more), no more.
    assert azure_faults.arm_proxy.fates("PUT", _VERSION_PUT.format(name)) == ["503"] * 9
