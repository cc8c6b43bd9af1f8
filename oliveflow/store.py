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
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout
from pydantic import BaseModel

from oliveflow.errors import InputError, StageError, causes
from oliveflow.hashing import file_sha256, tree_files, tree_sha256, tree_size
from oliveflow.results import Artifact
from oliveflow.settings import current

MANIFEST = "oliveflow-manifest.json"
RESULT_FILE = "oliveflow-result.json"
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
    return current().home / kind / hashlib.sha256(location.encode()).hexdigest()[:16]


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
        """Yield an empty temp folder; when the block succeeds it becomes the artifact for ``key``.

        A block that fails because the disk is full (whatever the library's own error says) raises one
        StageError saying so; the temp folder is removed either way."""
        try:
            with atomic_dir(self.path(stage, key)) as tmp:
                try:
                    yield tmp
                except Exception as exc:
                    _raise_if_disk_full(exc, tmp, stage, self.root)  # while the partial output still fills it
                    raise
        except OSError as exc:  # the manifest or the rename
            _raise_if_disk_full(exc, self.root, stage, self.root)
            raise
        if self.fs is not None:
            self._upload(stage, key)

    # ---- the URL store ----

    def _local(self, stage: str, key: str, verify: bool) -> Artifact | None:
        folder = self.path(stage, key)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if verify and not _matches(folder, manifest):
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
        with scratch_dir(final.parent, f".get-{key[:12]}-") as tmp:
            for remote in self.fs.find(source, detail=True).values():
                rel = remote["name"][len(source.rstrip("/")) + 1:]
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote["name"], str(tmp / rel), callback=_bar(f"download {stage}/{rel}",
                                                                                remote.get("size") or 0))
            if not _matches(tmp, manifest):
                log.warning("%s/%s on %s does not match its manifest; treating it as missing", stage, key[:12],
                            self.location)
                return None
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            replace_dir(tmp, final)
        return self._local(stage, key, verify=False)


def content_sha256(folder: Path) -> str:
    """An artifact's content hash: its output files. The stage's result record beside them holds measurements
    (seconds, latencies) that differ between identical runs, so it is checked by its own hash instead."""
    return tree_sha256(folder, exclude=frozenset({MANIFEST, RESULT_FILE}))


def _matches(folder: Path, manifest: dict) -> bool:
    record = manifest.get("result_sha256")
    return content_sha256(folder) == manifest.get("sha256") and (
        record is None or (folder / RESULT_FILE).is_file() and file_sha256(folder / RESULT_FILE) == record)


_LOW_SPACE = 64 << 20


def _raise_if_disk_full(exc: BaseException, where: Path, stage: str, store: Path) -> None:
    """A StageError when ``exc`` came from a full disk: an ENOSPC/EDQUOT anywhere in its chain, or (for
    libraries that hide the OSError, such as torch.save) less than 64 MiB left where the output was written."""
    full = any(isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT) for cause in causes(exc))
    free = shutil.disk_usage(where).free
    if full or free < _LOW_SPACE:
        raise StageError(f"{stage}: the disk holding the artifact store {store} is full ({free / 1e6:.1f} MB free; "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); the partial "
                         "output was removed. Free space (oliveflow cache prune --apply) or point "
                         "OLIVEFLOW_ARTIFACT_STORE at a larger disk") from exc


def _bar(description: str, size: int):
    """A byte progress bar for big files, none for small ones."""
    from fsspec.callbacks import NoOpCallback, TqdmCallback

    if size < _BAR_BYTES:
        return NoOpCallback()
    return TqdmCallback(tqdm_kwargs={"desc": description, "unit": "B", "unit_scale": True, "unit_divisor": 1024})


@contextlib.contextmanager
def staged_dir(final: Path, sweep: bool = True) -> Iterator[Path]:
    """Yield an empty temp folder beside ``final``; when the block ends without an error, the folder is renamed
    to ``final`` (a folder already there is moved aside first, and put back if the rename fails). On an error the
    temp folder goes; one a killed process left is swept by a later scratch folder unless ``sweep`` is False (see
    ``scratch_dir``). oliveflow's one temp folder + rename: the store (``atomic_dir``) and the published output use
    it, the tiny model its two parts (``scratch_dir``, ``replace_dir``)."""
    final = Path(final)
    with scratch_dir(final.parent, f".tmp-{final.name[:12]}-", sweep=sweep) as tmp:
        yield tmp
        replace_dir(tmp, final, sweep)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """``staged_dir`` for a store artifact: the folder gets its manifest just before the rename."""
    with staged_dir(final) as tmp:
        yield tmp
        record = tmp / RESULT_FILE
        (tmp / MANIFEST).write_text(json.dumps(
            {"sha256": content_sha256(tmp), "size_bytes": tree_size(tmp), "created": time.time(),
             "result_sha256": file_sha256(record) if record.exists() else None}, indent=1))


def replace_dir(tmp: Path, final: Path, sweep: bool = True) -> None:
    """Rename the folder ``tmp`` to ``final``, replacing a folder there (``sweep`` as in ``scratch_dir``)."""
    if not final.exists():
        os.replace(tmp, final)
        return
    # os.replace cannot overwrite a non-empty folder: move the old one aside, then drop it.
    with scratch_dir(final.parent, f".old-{final.name[:12]}-", sweep=sweep) as trash:
        os.replace(final, trash / "old")
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(trash / "old", final)
            raise


# Scratch folders beside artifacts: writes in progress, downloads, artifacts being dropped.
SCRATCH_PREFIXES = (".tmp-", ".get-", ".old-")


@contextlib.contextmanager
def scratch_dir(parent: Path, prefix: str, sweep: bool = True) -> Iterator[Path]:
    """A new folder in ``parent``, removed when the block ends, and held meanwhile by an OS lock beside it
    (``<folder>.lock``). The kernel drops the lock when this process dies, however it dies, so a folder whose
    lock is free was left by a killed run: the next scratch folder made in ``parent`` sweeps it away (unless
    ``sweep`` is False: a folder oliveflow does not own, where a ``.tmp-*`` may be someone else's)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        sweep_scratch(parent)
    folder = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
    lock = FileLock(f"{folder}.lock", thread_local=False)
    try:
        with lock:  # taken before the folder exists: a sweeper never sees it unheld
            folder.mkdir()
            try:
                yield folder
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        Path(f"{folder}.lock").unlink(missing_ok=True)


def stale_scratch(parent: Path) -> list[Path]:
    """Scratch folders (and their lock files) in ``parent`` that no living process holds."""
    stale = []
    for path in sorted(Path(parent).glob(".*")):
        folder = Path(str(path).removesuffix(".lock"))
        if not folder.name.startswith(SCRATCH_PREFIXES) or (path != folder and folder.exists()):
            continue  # not scratch, or a lock file whose folder is judged on its own
        if not lock_is_held(Path(f"{folder}.lock")):  # else a living writer holds it
            stale.append(path)
    return stale


def lock_is_held(path: Path) -> bool:
    """Whether a living process holds the OS lock on ``path``, probed without waiting (a new descriptor, so
    this process's own locks count as held too)."""
    lock = FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def sweep_scratch(parent: Path) -> int:
    """Remove what killed runs left in ``parent``; returns the bytes freed."""
    freed = 0
    for path in stale_scratch(parent):
        freed += tree_size(path) if path.exists() else 0
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            Path(f"{path}.lock").unlink(missing_ok=True)
        else:
            path.unlink(missing_ok=True)
    if freed:
        log.info("removed %.1f MB left in %s by a run that was killed", freed / 1e6, parent)
    return freed




def load_result(folder: Path, result_type: type[R]) -> R:
    """Read a stage result saved in an artifact folder, re-pointed at where the folder is now."""
    folder = Path(folder).resolve()
    try:
        text, manifest = (folder / RESULT_FILE).read_text(), json.loads((folder / MANIFEST).read_text())
    except OSError as exc:
        raise InputError(f"{folder} is not an oliveflow stage output (no {Path(exc.filename).name}); pass a folder "
                         "written by `oliveflow stage` or one under the artifact store") from None
    stored = result_type.model_validate_json(text)
    return stored.model_copy(update={"artifact": Artifact(path=folder, sha256=manifest["sha256"],
                                                          size_bytes=manifest["size_bytes"])})
