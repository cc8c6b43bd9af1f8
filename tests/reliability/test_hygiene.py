"""`oliveflow cache info` / `cache prune` on a real store: real artifacts, real Prefect records, a writer killed with
SIGKILL mid-write, a writer still running, a stage holding its cache key, a registered model in a real MLflow registry.

No pipeline run: the artifacts are written through ``ArtifactStore.write`` (as ``materialize`` does) and the records
through Prefect's own ResultStore with the stage tasks' serializer, so both are what a run leaves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from oliveflow.housekeeping import apply, cache_report, prune_plan
from oliveflow.lineage import CONTENT_TAG
from oliveflow.olive_runner import CONFIG_FILE
from oliveflow.results import Adapter, Artifact, OnnxModel, QuantizedModel, SmokeReport
from oliveflow.store import MANIFEST, RESULT_FILE, ArtifactStore, load_result
from runs import OLIVEFLOW, REPO, run_env

MODEL_NAME = "oliveflow-model"

# Roles of the helper processes: write an artifact and wait inside store.write, or hold a stage's cache-key lock.
CHILD = r"""
import sys, time
from pathlib import Path
role, store, stage, key = sys.argv[1:5]
if role == "write":
    from oliveflow.store import ArtifactStore
    with ArtifactStore(store).write(stage, key) as tmp:
        (tmp / "model.bin").write_bytes(b"w" * 5000)
        work = tmp / ".olive-work" / "cache"  # where Olive works during a stage (olive_runner.WORK_DIR)
        work.mkdir(parents=True)
        (work / "copy.bin").write_bytes(b"o" * 7000)
        print("ready", tmp, flush=True)
        time.sleep(600)
else:
    from tasks.locking import lock_manager
    locks = lock_manager()  # kept: the lock ends with its manager
    assert locks.acquire_lock(key, holder="running-stage")
    print("ready", flush=True)
    time.sleep(600)
"""


def key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _env(root: Path) -> dict[str, str]:
    env = run_env(root)
    for name in ("OLIVEFLOW_ARTIFACT_STORE", "OLIVEFLOW_LOCK_URL", "OLIVEFLOW_LOCK_DIR",
                 "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"):
        env.pop(name, None)
    return env


def _result(stage: str, folder: Path):
    """A stage result as the stage function returns it: its artifact is still the temp folder."""
    artifact = Artifact(path=folder, sha256="0" * 64, size_bytes=0)
    if stage == "quantize":
        return QuantizedModel(artifact=artifact, algorithm="rtn", bits=4, group_size=32, size_before_bytes=9,
                              size_after_bytes=3, seconds=1.0)
    if stage == "finetune":
        return Adapter(artifact=artifact, train_loss=[2.0, 1.5], eval_loss_original=2.0, eval_loss_quantized=2.1,
                       eval_loss_finetuned=1.4, seconds=1.0)
    if stage == "export":
        return OnnxModel(artifact=artifact, adapter_name="adapter_weights.onnx_adapter", device="cpu", seconds=1.0)
    numbers = {name: 0 for name, field in SmokeReport.model_fields.items() if field.is_required()}
    return SmokeReport.model_validate({**numbers, "artifact": artifact, "answered": True, "samples": []})


class World:
    """A store, its records, locks and leftovers under one tmp folder, laid out as oliveflow lays them out."""

    def __init__(self, root: Path):
        self.root, self.home, self.env = root, root / "home", _env(root)
        self.store = ArtifactStore(self.home / "artifacts")
        self.records = root / "prefect" / "storage"
        self.locks = self.home / "locks"
        self.children: list[subprocess.Popen] = []

    def artifact(self, stage: str, name: str, reads: list[Path] = (), size: int = 3000) -> Path:
        with self.store.write(stage, key(name)) as tmp:
            (tmp / "model").mkdir()
            (tmp / "model" / "weights.bin").write_bytes(name.encode() * (size // len(name)))
            if reads:  # the Olive config a stage saves names the store folders it read
                (tmp / CONFIG_FILE).write_text(json.dumps(
                    {"input_model": {"type": "HfModel", "model_path": str(reads[0]),
                                     **({"adapter_path": str(reads[1])} if len(reads) > 1 else {})},
                     "output_dir": ".olive-work/output", "cache_dir": ".olive-work/cache"}))
            (tmp / RESULT_FILE).write_text(_result(stage, tmp).model_dump_json(indent=1))
        return self.store.path(stage, key(name))

    def record(self, name: str, folder: Path | None = None, obj=None) -> Path:
        """The cache record Prefect writes for a stage task (result_serializer="json", local result storage)."""
        from prefect.filesystems import LocalFileSystem
        from prefect.results import ResultStore
        from prefect.serializers import JSONSerializer

        if obj is None:
            stage = folder.parent.name
            obj = load_result(folder, type(_result(stage, folder)))
        records = ResultStore(result_storage=LocalFileSystem(basepath=str(self.records)), serializer=JSONSerializer())
        records.write(key=key(name), obj=obj)
        assert records.read(key(name)).result == obj  # Prefect reads it back
        return self.records / key(name)

    def child(self, role: str, stage: str, name: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, role, str(self.store.root), stage, key(name)],
                                cwd=REPO, env=self.env, stdout=subprocess.PIPE, text=True)
        self.children.append(proc)
        line = proc.stdout.readline()
        assert line.startswith("ready"), f"helper {role} did not start: {line!r}"
        return proc

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*OLIVEFLOW, "cache", *args], cwd=REPO, env=self.env, text=True, capture_output=True,
                              timeout=300)

    def stop(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def registry_template(tmp_path_factory) -> Path:
    """An MLflow registry (SQLite, made by MLflow) with one version of the model; copied into each world."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    client.create_registered_model(MODEL_NAME)
    # Its source is MLflow's own copy of the model (log_model copies the folder), never a store path.
    client.create_model_version(MODEL_NAME, str(db.parent / "logged-model"), tags={CONTENT_TAG: "set-per-world"})
    return db


@pytest.fixture
def world(tmp_path, registry_template, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("OLIVEFLOW_HOME", str(tmp_path / "home"))
    for name in ("MLFLOW_TRACKING_URI", "OLIVEFLOW_ARTIFACT_STORE", "OLIVEFLOW_LOCK_URL", "OLIVEFLOW_LOCK_DIR"):
        monkeypatch.delenv(name, raising=False)
    w = World(tmp_path)
    a = w.paths = {}
    # Artifacts first: every write sweeps the stale scratch beside it, and the killed writer's must stay.
    a["recorded"] = w.artifact("quantize", "recorded")
    a["read_by_recorded"] = w.artifact("quantize", "read-by-recorded")
    a["recorded_reader"] = w.artifact("finetune", "recorded-reader", reads=[a["read_by_recorded"] / "model"])
    a["read_by_registered_q"] = w.artifact("quantize", "read-by-registered-q")
    a["read_by_registered_f"] = w.artifact("finetune", "read-by-registered-f")
    a["registered"] = w.artifact("export", "registered", reads=[a["read_by_registered_q"] / "model",
                                                                 a["read_by_registered_f"] / "adapter"])
    a["unreferenced"] = w.artifact("quantize", "unreferenced", size=4000)
    a["held"] = w.artifact("smoke_test", "held")
    a["damaged"] = w.artifact("finetune", "damaged")
    a["altered"] = w.artifact("quantize", "altered")
    with open(a["damaged"] / "model" / "weights.bin", "ab") as f:
        f.write(b"appended after the manifest")
    weights = a["altered"] / "model" / "weights.bin"
    weights.write_bytes(b"X" + weights.read_bytes()[1:])  # same size: only hashing sees it

    for name in ("recorded", "recorded-reader", "damaged", "altered"):
        w.record(name, a[name.replace("-", "_")])
    # A record whose artifact is gone: written, then its artifact removed behind the store's back.
    a["gone"] = w.artifact("export", "gone")
    a["gone_record"] = w.record("gone", a["gone"])
    shutil.rmtree(a["gone"])
    a["damaged_record"] = w.records / key("damaged")
    other = ArtifactStore(tmp_path / "other-store")
    with other.write("quantize", key("other")) as tmp:
        (tmp / RESULT_FILE).write_text(_result("quantize", tmp).model_dump_json())
    w.record("other", other.path("quantize", key("other")))  # another store's record: not this store's business
    w.record("not-a-stage", obj={"answer": 42})  # some other task's record in the same Prefect storage
    (w.records / key("garbage")).write_text('{"metadata": {"storage_key": "trunc')  # a cut-short record
    (w.records / "64ed5025f2ed48d7a4b751fa4e97bfca").write_text("gAWVDAEAAAAAAACMEm9saXZlZmxvdy50cmFja2luZ5SM")
    # ^ a failed task's pickled exception, as Prefect stores it under a random name

    db = w.home / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True)
    shutil.copy(registry_template, db)
    sha = json.loads((a["registered"] / MANIFEST).read_text())["sha256"]
    MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}").set_model_version_tag(
        MODEL_NAME, "1", CONTENT_TAG, sha)

    w.locks.mkdir(parents=True)
    a["free_lock"] = w.locks / f"{key('finished-long-ago')}.lock"
    with FileLock(a["free_lock"], thread_local=False):  # what HostLockManager leaves when a run ends
        pass
    a["olive_cache"] = w.home / ".olive-cache"  # Olive's default cache, made in the working folder
    (a["olive_cache"] / "default_workflow").mkdir(parents=True)
    (a["olive_cache"] / "default_workflow" / "model.onnx").write_bytes(b"c" * 2500)

    killed = w.child("write", "quantize", "killed")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    (a["stale"],) = (p for p in (w.store.root / "quantize").glob(".tmp-*") if p.is_dir())
    w.child("write", "finetune", "live")
    (a["live"],) = (p for p in (w.store.root / "finetune").glob(".tmp-*") if p.is_dir())
    w.child("lock", "smoke_test", "held")
    a["held_lock"] = w.locks / f"{key('held')}.lock"
    yield w
    w.stop()


def _tree(root: Path) -> dict[Path, int]:
    return {p: (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


def test_info_counts_what_each_part_holds(world):
    w, a = world, world.paths
    report = cache_report(w.store.location, w.home, w.records)
    stages = {s.stage: s for s in report.stages}
    assert {name: (s.artifacts, s.intact, s.damaged, s.unreferenced) for name, s in stages.items()} == {
        "quantize": (5, 5, 0, 1), "finetune": (3, 2, 1, 0), "export": (1, 1, 0, 0), "smoke_test": (1, 1, 0, 1)}
    assert stages["quantize"].unreferenced_bytes == sum(
        f.stat().st_size for f in a["unreferenced"].rglob("*") if f.is_file())
    kept = {a.path: a.kept_by for a in report.artifacts}
    assert kept[a["read_by_recorded"]] == [f"read by finetune/{key('recorded-reader')[:12]}"]
    assert kept[a["registered"]] == [f"registered as {MODEL_NAME} v1"]
    assert kept[a["read_by_registered_q"]] == kept[a["read_by_registered_f"]] == [
        f"read by export/{key('registered')[:12]}"]
    assert kept[a["recorded"]] == [f"cache record {key('recorded')[:12]}"]

    assert [(s.path, s.stale) for s in report.scratch] == [(a["live"], False), (a["stale"], True)]
    stale = next(s for s in report.scratch if s.stale)
    assert stale.bytes == 5000 + 7000 and stale.olive_bytes == 7000
    assert {(o.path, o.bytes, o.where) for o in report.olive} == {
        (a["olive_cache"], 2500, "loose"), (a["stale"] / ".olive-work", 7000, "stale scratch"),
        (a["live"] / ".olive-work", 7000, "in scratch")}

    statuses = {r.path.name: r.status for r in report.records}
    assert statuses == {key("recorded"): "ok", key("recorded-reader"): "ok", key("altered"): "ok",
                        key("damaged"): "orphan", key("gone"): "orphan", key("other"): "foreign",
                        key("not-a-stage"): "foreign", key("garbage"): "unreadable",
                        "64ed5025f2ed48d7a4b751fa4e97bfca": "foreign"}
    assert {(lock.path, lock.held) for lock in report.locks} == {(a["free_lock"], False), (a["held_lock"], True)}
    assert report.home_folders["mlflow"] > 0 and "artifacts" in report.home_folders

    verified = cache_report(w.store.location, w.home, w.records, verify=True)
    assert {x.path for x in verified.artifacts if x.problem} == {a["damaged"], a["altered"]}

    done = w.cli("info", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    shown = json.loads(done.stdout)
    assert shown["stages"] == [s.model_dump(mode="json") for s in report.stages]
    assert shown["records_dir"] == str(w.records.resolve())
    done = w.cli("info")
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    assert f"artifact store  {w.store.root}" in text and str(w.records.resolve()) in text
    assert "2 point at a missing or damaged artifact, 3 for other stores or tasks, 1 unreadable" in text
    assert f"2 in {w.locks}, 1 held" in text and "(and 1 in use by a running stage)" in text
    assert "--verify" in text


def test_dry_run_removes_nothing_and_apply_removes_exactly_the_plan(world):
    w, a = world, world.paths
    before = _tree(w.root)
    done = w.cli("prune", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    plan = {Path(item["path"]): item["reason"] for item in json.loads(done.stdout)["items"]}
    assert set(plan) == {a["stale"], a["damaged"], a["unreferenced"], a["held"], a["damaged_record"],
                         a["gone_record"], a["olive_cache"], a["free_lock"]}
    assert plan[a["stale"]].startswith("stale scratch") and plan[a["damaged"]].startswith("damaged artifact")
    assert plan[a["gone_record"]] == "cache record whose artifact is gone"
    assert plan[a["damaged_record"]] == "cache record whose artifact is damaged"

    done = w.cli("prune")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "dry run: nothing removed; add --apply"
    assert lines[-2].startswith("total: 8 items, ")
    assert all(any(str(path) in line and reason in line for line in lines) for path, reason in plan.items())
    assert _tree(w.root) == before, "a dry run changes nothing"

    done = w.cli("prune", "--apply", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    outcome = json.loads(done.stdout)["outcome"]
    assert [(Path(s["item"]["path"]), s["why"]) for s in outcome["skipped"]] == [
        (a["held"], f"a running stage holds cache key {key('held')[:12]}")]
    removed = {Path(item["path"]) for item in outcome["removed"]}
    assert removed == set(plan) - {a["held"]}
    after = _tree(w.root)
    gone = set(before) - set(after)
    assert gone == {p for p in before if p in removed or removed & set(p.parents)} | {Path(f"{a['stale']}.lock")}
    assert set(after) <= set(before), "nothing new is left behind (no lock files, no trash folders)"
    for survivor in ("recorded", "read_by_recorded", "recorded_reader", "registered", "read_by_registered_q",
                     "read_by_registered_f", "altered", "held", "live", "held_lock"):
        assert a[survivor].exists(), survivor
    assert all(proc.poll() is None for proc in w.children[1:]), "the live writer and the lock holder still run"

    done = w.cli("prune", "--json")
    assert [Path(item["path"]) for item in json.loads(done.stdout)["items"]] == [a["held"]]


def test_apply_in_process_re_checks_each_item(world):
    """A plan made earlier: what became referenced or held since is skipped, not removed."""
    w, a = world, world.paths
    plan = prune_plan(cache_report(w.store.location, w.home, w.records))
    w.record("unreferenced", a["unreferenced"])  # a run recorded it after the plan was made
    outcome = apply(plan)
    why = {s.item.path: s.why for s in outcome.skipped}
    assert why == {a["unreferenced"]: "a cache record points at it now",
                   a["held"]: f"a running stage holds cache key {key('held')[:12]}"}
    assert a["unreferenced"].is_dir() and a["held"].is_dir() and not a["damaged"].exists()
    assert outcome.freed_bytes == sum(item.bytes for item in outcome.removed) > 0


def test_bad_store_is_one_line_and_exit_2(tmp_path):
    env = _env(tmp_path)
    (tmp_path / "a-file").write_text("not a store")
    for args in (["info", "--store", str(tmp_path / "missing")], ["prune", "--store", str(tmp_path / "a-file")],
                 ["prune", "--apply", "--store", "nosuch://bucket/prefix"]):
        done = subprocess.run([*OLIVEFLOW, "cache", *args], cwd=REPO, env=env, text=True, capture_output=True,
                              timeout=300)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("oliveflow: error: "), done.stderr
        assert "Traceback" not in done.stderr


def test_the_cache_commands_import_no_prefect_server(tmp_path):
    code = ("import sys\nfrom oliveflow.cli import main\n"
            "assert main(['cache', 'info']) == 0 and main(['cache', 'prune', '--apply']) == 0\n"
            "loaded = [m for m in sys.modules if m.startswith('prefect.server')]\n"
            "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(tmp_path), text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_url_store_is_pruned_on_this_host_only(tmp_path, monkeypatch):
    """memory:// stands in for az://: the same ArtifactStore code path, objects in this process's memory."""
    import fsspec

    monkeypatch.setenv("OLIVEFLOW_HOME", str(tmp_path / "home"))
    w = World(tmp_path)
    url = f"memory://oliveflow-hygiene-{tmp_path.name}/store"
    w.store = ArtifactStore(url)
    assert w.store.root.is_relative_to(tmp_path / "home" / "store-cache")
    kept, loose = w.artifact("quantize", "kept"), w.artifact("quantize", "loose")
    w.record("kept", kept)
    shutil.rmtree(kept)  # this host lost its copy; the URL still has it, so the record still holds
    report = cache_report(url, w.home, w.records)
    assert [r.status for r in report.records] == ["remote"]
    assert any("only this host's copy" in note for note in report.notes)
    plan = prune_plan(report)
    assert [(item.path, item.kind) for item in plan] == [(loose, "unreferenced")]
    assert "this host's copy" in plan[0].reason
    assert not apply(plan).skipped and not loose.exists()
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"oliveflow-hygiene-{tmp_path.name}/store/quantize/{key('loose')}/oliveflow-manifest.json")
