import pytest

from oliveflow.hashing import config_sha256, tree_sha256
from oliveflow.store import ArtifactStore


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
