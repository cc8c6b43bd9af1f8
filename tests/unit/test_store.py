import pytest

from oliveflow.hashing import config_sha256, tree_sha256
from oliveflow.store import MANIFEST, ArtifactStore
from oliveflow.store import RESULT_FILE


def test_write_is_atomic_and_verified(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.write("s", "k1") as tmp:
        (tmp / "a.txt").write_text("hello")
    found = store.lookup("s", "k1")
    assert found is not None and found.path == tmp_path / "s" / "k1"
    (found.path / "a.txt").write_text("tampered")
    assert store.lookup("s", "k1") is None, "an altered artifact must not be served"


def test_failed_write_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.write("s", "k2") as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("stage failed")
    assert list((tmp_path / "s").iterdir()) == []


def test_failed_rewrite_keeps_previous_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.write("s", "k") as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with store.write("s", "k") as tmp:
            raise RuntimeError
    assert (store.lookup("s", "k").path / "a.txt").read_text() == "v1"


def test_tree_hash_covers_names_and_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("1")
    first = tree_sha256(tmp_path / "a")
    (tmp_path / "a" / "x").rename(tmp_path / "a" / "y")
    assert tree_sha256(tmp_path / "a") != first


def test_config_hash_is_canonical():
    assert config_sha256({"a": 1, "b": 2}) == config_sha256({"b": 2, "a": 1})
    assert config_sha256({"a": 1}) != config_sha256({"a": 2})


# ---- a store on shared object storage: two hosts, each with its own local copy ----

def _hosts(url: str, tmp_path):
    return ArtifactStore(url, cache_dir=tmp_path / "host-a"), ArtifactStore(url, cache_dir=tmp_path / "host-b")


def _write(store: ArtifactStore, key: str, files: dict[str, bytes]) -> None:
    with store.write("s", key) as tmp:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)


FILES = {"model/model.onnx": b"graph" * 1000, "model/genai_config.json": b"{}", RESULT_FILE: b"{}"}


def test_url_store_serves_one_hosts_artifact_to_another(tmp_path):
    a, b = _hosts(f"memory://{tmp_path.name}/store", tmp_path)
    assert b.lookup("s", "k") is None
    _write(a, "k", FILES)
    found = b.lookup("s", "k")
    assert found is not None and found.path == tmp_path / "host-b" / "s" / "k"
    assert found.sha256 == a.lookup("s", "k").sha256
    assert {p: (found.path / p).read_bytes() for p in FILES} == FILES
    assert b.location == a.location == f"memory://{tmp_path.name}/store"


def test_url_store_never_serves_an_upload_cut_short_or_altered(tmp_path):
    a, b = _hosts(f"memory://{tmp_path.name}/store", tmp_path)
    _write(a, "k", FILES)
    remote = f"{a._remote}/s/k"
    (files,) = a.fs.glob(f"{remote}/files-*")
    a.fs.pipe_file(f"{files}/model/model.onnx", b"tampered")
    assert b.lookup("s", "k") is None, "a download that does not match its manifest must not be served"
    assert not (tmp_path / "host-b" / "s" / "k").exists() and not list((tmp_path / "host-b" / "s").glob(".get-*"))
    a.fs.rm(f"{remote}/{MANIFEST}")  # as if the upload died before its last file
    assert b.lookup("s", "k") is None


def test_url_store_writer_cut_short_leaves_the_previous_version_served(tmp_path, monkeypatch):
    """Two hosts computed the same key (no shared lock): the second dies before committing its different files."""
    a, b = _hosts(f"memory://{tmp_path.name}/store", tmp_path)
    _write(a, "k", FILES)

    def die(*args):
        raise ConnectionError("host b lost its network before committing")

    monkeypatch.setattr(b, "_commit", die)
    with pytest.raises(ConnectionError):
        _write(b, "k", {**FILES, "model/model.onnx": b"another training run"})
    reader = ArtifactStore(a.location, cache_dir=tmp_path / "host-c")
    found = reader.lookup("s", "k")
    assert found is not None and (found.path / "model" / "model.onnx").read_bytes() == FILES["model/model.onnx"]


def test_url_store_republishes_what_only_this_host_has(tmp_path):
    a, b = _hosts(f"memory://{tmp_path.name}/store", tmp_path)
    _write(a, "k", FILES)
    a.fs.rm(f"{a._remote}/s/k", recursive=True)  # e.g. the upload failed, or the bucket was cleaned
    assert a.lookup("s", "k") is not None
    assert b.lookup("s", "k") is not None, "host a's lookup should have uploaded its copy again"


def test_url_store_on_azurite(tmp_path, azurite_http, monkeypatch):
    """The scale-out store for real: adlfs against Azurite's blob service, credentials from the environment."""
    from azure.storage.blob import BlobServiceClient

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_http.connection_string)
    a, b = _hosts("az://oliveflow-store/team-a", tmp_path)
    _write(a, "k", FILES)
    blobs = BlobServiceClient.from_connection_string(azurite_http.connection_string)
    names = sorted(x.name for x in blobs.get_container_client("oliveflow-store").list_blobs())
    files = f"team-a/s/k/files-{a.lookup('s', 'k').sha256[:16]}"
    assert names == sorted([f"{files}/{p}" for p in FILES] + [f"team-a/s/k/{MANIFEST}"])
    found = b.lookup("s", "k")
    assert found is not None and (found.path / "model" / "model.onnx").read_bytes() == FILES["model/model.onnx"]


def test_unknown_store_protocol_is_a_clear_error():
    from pydantic import ValidationError

    from oliveflow.config import PipelineParams

    with pytest.raises(ValidationError, match="unknown protocol 'nope'"):
        PipelineParams(artifact_store="nope://x/y")
