"""Content-addressed artifact store on a local folder or on shared object storage (an fsspec URL).

Layout: ``<root>/<stage>/<key>/`` holds a stage's output plus ``oliveflow-manifest.json``
(the hash of everything else). Writers fill a temp folder beside it and rename it into
place, so a reader never sees half an artifact and a failed stage leaves nothing behind.

With a URL (``az://container/prefix`` through adlfs, or any fsspec protocol installed), the
objects under the URL are the store and each host keeps a local copy to run Olive on
(``$OLIVEFLOW_HOME/store-cache/<hash of the URL>/``). Remotely an artifact is
``<stage>/<key>/files-<content hash>/...`` plus ``<stage>/<key>/oliveflow-manifest.json``, uploaded
last: the manifest commits one complete file set, so an upload cut short is never served and two
hosts writing the same key never mix their files. Downloads are checked against the manifest's
hash before they are renamed into the local copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from oliveflow.errors import InputError
from oliveflow.hashing import tree_files, tree_sha256, tree_size
from oliveflow.results import Artifact

MANIFEST = "oliveflow-manifest.json"
R = TypeVar("R", bound=BaseModel)
log = logging.getLogger(__name__)
_BAR_BYTES = 64 << 20  # files at least this big get a progress bar while they travel


def is_url(location: str | Path) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def url_filesystem(location: str, what: str):
    """``(fsspec filesystem, path)`` for a URL; an InputError naming ``what`` when its protocol cannot be used."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as exc:
        raise InputError(f"{what} {location}: {exc}; install the package for its protocol (az:// needs adlfs: "
                         "pip install 'oliveflow[scale-out]')") from None


def host_copies(kind: str, location: str) -> Path:
    """This host's folder for copies of what lives at the URL ``location``: ``$OLIVEFLOW_HOME/<kind>/<url hash>``."""
    from oliveflow.config import oliveflow_home

    return oliveflow_home() / kind / hashlib.sha256(location.encode()).hexdigest()[:16]


class ArtifactStore:
    """The store at ``location``: a local folder, or an fsspec URL mirrored into a local folder."""

    def __init__(self, location: str | Path, cache_dir: Path | None = None):
        if is_url(location):
            self.location = str(location).rstrip("/")
            self.fs, self._remote = url_filesystem(self.location, "artifact store")
            self.root = Path(cache_dir or host_copies("store-cache", self.location)).expanduser().resolve()
        else:
            self.fs = None
            self.root = Path(str(location).removeprefix("file://")).expanduser().resolve()
            self.location = str(self.root)

    def path(self, stage: str, key: str) -> Path:
        """Where the artifact is (or will be) on this host."""
        return self.root / stage / key

    def lookup(self, stage: str, key: str, verify: bool = True) -> Artifact | None:
        """The artifact stored under ``key`` (on this host), or None when missing, half-written or altered.

        For a URL store: an artifact on the store and not here is downloaded; one here and not (or no
        longer) on the store is uploaded, so the two agree before it is used.
        """
        local = self._local(stage, key, verify)
        if self.fs is None:
            return local
        remote = self._remote_manifest(stage, key)
        if remote is None:
            if local is not None:
                self._upload(stage, key)
            return local
        if local is not None and local.sha256 == remote["sha256"]:
            return local
        return self._download(stage, key, remote)

    @contextlib.contextmanager
    def write(self, stage: str, key: str) -> Iterator[Path]:
        """Yield an empty temp folder; when the block succeeds it becomes the artifact for ``key``."""
        with atomic_dir(self.path(stage, key)) as tmp:
            yield tmp
        if self.fs is not None:
            self._upload(stage, key)

    # ---- the URL store ----

    def _local(self, stage: str, key: str, verify: bool) -> Artifact | None:
        folder = self.path(stage, key)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if verify and tree_sha256(folder, exclude=frozenset({MANIFEST})) != manifest.get("sha256"):
            return None
        return Artifact(path=folder, sha256=manifest["sha256"], size_bytes=manifest["size_bytes"])

    def _remote_dir(self, stage: str, key: str) -> str:
        return f"{self._remote}/{stage}/{key}"

    def _remote_manifest(self, stage: str, key: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(f"{self._remote_dir(stage, key)}/{MANIFEST}"))
        except (FileNotFoundError, ValueError):
            return None

    def _remote_files(self, stage: str, key: str, sha256: str) -> str:
        """Where one version of the artifact's files lives: named by its content, so writers never mix."""
        return f"{self._remote_dir(stage, key)}/files-{sha256[:16]}"

    def _upload(self, stage: str, key: str) -> None:
        folder = self.path(stage, key)
        manifest = (folder / MANIFEST).read_bytes()
        target = self._remote_files(stage, key, json.loads(manifest)["sha256"])
        started = time.perf_counter()
        with contextlib.suppress(FileExistsError):
            self.fs.mkdir(target, create_parents=True)  # creates the bucket/container on first use
        for path in tree_files(folder, exclude=frozenset({MANIFEST})):
            rel = path.relative_to(folder).as_posix()
            self.fs.put_file(str(path), f"{target}/{rel}", callback=_bar(f"upload {stage}/{rel}", path.stat().st_size))
        self._commit(stage, key, manifest)
        log.info("uploaded %s/%s to %s in %.1f s", stage, key[:12], self.location, time.perf_counter() - started)

    def _commit(self, stage: str, key: str, manifest: bytes) -> None:
        """Write the manifest, one small object put at once: from then on readers get this version's files."""
        self.fs.pipe_file(f"{self._remote_dir(stage, key)}/{MANIFEST}", manifest)
        self.fs.invalidate_cache(self._remote_dir(stage, key))

    def _download(self, stage: str, key: str, manifest: dict) -> Artifact | None:
        source, final = self._remote_files(stage, key, manifest["sha256"]), self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".get-{key[:12]}-", dir=final.parent))
        try:
            for remote in self.fs.find(source, detail=True).values():
                rel = remote["name"][len(source.rstrip("/")) + 1:]
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote["name"], str(tmp / rel), callback=_bar(f"download {stage}/{rel}",
                                                                                remote.get("size") or 0))
            if tree_sha256(tmp) != manifest.get("sha256"):
                log.warning("%s/%s on %s does not match its manifest; treating it as missing", stage, key[:12],
                            self.location)
                return None
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self._local(stage, key, verify=False)


def _bar(description: str, size: int):
    """A byte progress bar for big files, none for small ones."""
    from fsspec.callbacks import NoOpCallback, TqdmCallback

    if size < _BAR_BYTES:
        return NoOpCallback()
    return TqdmCallback(tqdm_kwargs={"desc": description, "unit": "B", "unit_scale": True, "unit_divisor": 1024})


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``final``; on success it replaces ``final`` (with a manifest)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name[:12]}-", dir=final.parent))
    try:
        yield tmp
        content = tree_sha256(tmp)
        (tmp / MANIFEST).write_text(json.dumps(
            {"sha256": content, "size_bytes": tree_size(tmp), "created": time.time()}, indent=1))
        _replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(tmp: Path, final: Path) -> None:
    if final.exists():
        # A stale or damaged artifact under the same name: move it aside, then drop it.
        trash = Path(tempfile.mkdtemp(prefix=f".old-{final.name[:12]}-", dir=final.parent))
        os.replace(final, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)


RESULT_FILE = "oliveflow-result.json"


def load_result(folder: Path, result_type: type[R]) -> R:
    """Read a stage result saved in an artifact folder, re-pointed at where the folder is now."""
    folder = Path(folder).resolve()
    try:
        text = (folder / RESULT_FILE).read_text()
    except OSError:
        raise InputError(f"{folder} is not an oliveflow stage output (no {RESULT_FILE}); pass a folder written by "
                         "`oliveflow stage` or one under the artifact store") from None
    stored = result_type.model_validate_json(text)
    manifest = json.loads((folder / MANIFEST).read_text())
    return stored.model_copy(update={"artifact": Artifact(path=folder, sha256=manifest["sha256"],
                                                          size_bytes=manifest["size_bytes"])})
