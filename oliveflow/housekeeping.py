"""Cache housekeeping: what the artifact store and the files around it hold, and what nothing points at any more.

``cache_report`` surveys a store (this host's copy, for a URL store), Prefect's cache records, the cache-key
lock files, Olive's leftovers and the other folders of ``$OLIVEFLOW_HOME``. ``prune_plan`` picks from a report
what can go, each item with its reason; ``apply`` removes a plan, re-checking every item at that moment under
the lock its writers take, so a running stage never loses what it holds. The CLI (``oliveflow cache info`` /
``oliveflow cache prune [--apply]``) is a thin layer over these three.

What keeps an artifact (``<store>/<stage>/<key>/``):
- a readable Prefect cache record under its key (the store key is the Prefect cache key) that points at it;
- being the input of a kept artifact: a stage's saved Olive config and result name the store folders it read
  (the finetune's ``olive_config.json`` names the quantize artifact, the export's both);
- a registered model version: MLflow's versions carry the export artifact's content hash (``content_sha256``)
  and a ``source``; a version whose hash or source is in the store keeps that artifact. MLflow and Azure ML
  hold their own copy of the model (``log_model`` copies the folder, Azure ML uploads it), so this is caution,
  not need: the artifact a registered model came from is kept to be found again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, computed_field

from oliveflow.errors import InputError
from oliveflow.lineage import CONTENT_TAG, public_uri
from oliveflow.olive_runner import WORK_DIR
from oliveflow.settings import Settings, current
from oliveflow.store import MANIFEST, SCRATCH_PREFIXES, ArtifactStore, lock_is_held, scratch_dir, stale_scratch

# Olive's work folder inside a stage's temp folder, and Olive's default cache (olive.common.constants
# DEFAULT_CACHE_DIR, made in the working folder when a config names no cache_dir; not imported: Olive is slow to load).
OLIVE_DIRS = (WORK_DIR, ".olive-cache")
_KEY = re.compile(r"[0-9a-f]{64}")  # a stage key (sha256): only such folders are ever taken for artifacts
_SMALL_JSON = 1 << 20  # an artifact's own JSON files above this are model data, not references


@dataclass(frozen=True)
class PrefectRecords:
    """Where Prefect keeps the cache records of local runs, as its settings say; read by the caller (the CLI), as
    nothing under ``oliveflow/`` imports Prefect."""

    local_storage_path: Path  # PREFECT_LOCAL_STORAGE_PATH (settings.results.local_storage_path)
    # The settings that are set and may send records elsewhere: PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, PREFECT_API_URL.
    elsewhere: tuple[str, ...] = ()


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class ArtifactEntry(_Frozen):
    stage: str
    key: str
    path: Path
    bytes: int
    sha256: str | None = None
    problem: str | None = None  # None: intact
    kept_by: list[str] = []  # why it stays: a record, a recorded artifact that read it, a registered version


class ScratchEntry(_Frozen):
    """A temp folder beside artifacts (``.tmp-*``, ``.get-*``, ``.old-*``), or the lock file of one that is gone."""

    path: Path
    bytes: int
    stale: bool  # no living process holds its lock: a killed run left it
    olive_bytes: int = 0


class RecordEntry(_Frozen):
    path: Path
    bytes: int
    artifact: Path | None = None
    # ok: points at an intact artifact of this store; orphan: at one that is missing or damaged; remote: a URL
    # store's artifact this host has no intact copy of; foreign: another store's, or not an oliveflow stage's;
    # unreadable: named by a stage key but not a readable record (left alone: the next run rewrites it).
    status: Literal["ok", "orphan", "remote", "foreign", "unreadable"]


class LockEntry(_Frozen):
    path: Path
    held: bool


class OliveLeftover(_Frozen):
    path: Path
    bytes: int
    # loose: in no temp folder and no artifact; stale scratch: inside one a killed run left (goes with it);
    # in scratch: inside a temp folder a process holds, or another store's; artifact: part of an artifact's hash.
    where: Literal["loose", "stale scratch", "in scratch", "artifact"]


class StageSummary(_Frozen):
    stage: str
    artifacts: int
    bytes: int
    intact: int
    damaged: int
    unreferenced: int
    unreferenced_bytes: int


class CacheReport(_Frozen):
    store: str
    root: Path  # the store's folder on this host (for a URL store, this host's copy)
    is_url: bool
    verified: bool  # every artifact hashed (--verify), not only its manifest and size checked
    home: Path
    records_dir: Path | None
    locks_dir: Path | None
    records_complete: bool  # the records here are all there are: an artifact without one is unreferenced
    registry_read: bool  # the registered versions are known; when not, every export artifact is kept
    artifacts: list[ArtifactEntry]
    scratch: list[ScratchEntry]
    records: list[RecordEntry]
    locks: list[LockEntry]
    olive: list[OliveLeftover]
    home_folders: dict[str, int]
    notes: list[str]

    @computed_field
    @property
    def stages(self) -> list[StageSummary]:
        summaries = []
        for stage in sorted({a.stage for a in self.artifacts}):
            mine = [a for a in self.artifacts if a.stage == stage]
            loose = [a for a in mine if a.problem is None and not a.kept_by]
            summaries.append(StageSummary(
                stage=stage, artifacts=len(mine), bytes=sum(a.bytes for a in mine),
                intact=sum(a.problem is None for a in mine), damaged=sum(a.problem is not None for a in mine),
                unreferenced=len(loose), unreferenced_bytes=sum(a.bytes for a in loose)))
        return summaries


class PruneItem(_Frozen):
    path: Path
    bytes: int
    reason: str
    kind: Literal["scratch", "damaged", "unreferenced", "record", "olive", "lock"]
    key: str | None = None  # the cache key whose lock its writers hold (artifacts and records)
    record: Path | None = None  # unreferenced: the record that would keep it, checked again before removal
    verify: bool = False  # damaged: found by hashing, so re-checked by hashing


class Skipped(_Frozen):
    item: PruneItem
    why: str


class PruneOutcome(_Frozen):
    removed: list[PruneItem]
    skipped: list[Skipped]

    @computed_field
    @property
    def freed_bytes(self) -> int:
        return sum(item.bytes for item in self.removed)


# ---- survey ----

def cache_report(store_location: str | Path, home: Path | None = None,
                 prefect_storage: Path | PrefectRecords | None = None, *,
                 verify: bool = False, must_exist: bool = False, settings: Settings | None = None) -> CacheReport:
    """Survey the store at ``store_location`` and what surrounds it. It only reads, except that probing the lock of
    a scratch folder whose lock file is missing (``stale_scratch``) makes that file.

    ``home``: ``$OLIVEFLOW_HOME`` by default; ``prefect_storage``: where Prefect keeps cache records for local runs:
    a folder (all the records there are), or Prefect's settings (``PrefectRecords``); None: not known, so artifacts
    with no record are kept; ``verify`` hashes every artifact instead of checking its manifest and size;
    ``must_exist``: a store folder that does not exist is an InputError rather than an empty store; ``settings``:
    the current ones by default (the lock folder, the tracking URI).
    """
    settings = settings or current()
    home = Path(home or settings.home).expanduser().resolve()
    store = ArtifactStore(store_location)  # an InputError for a URL whose protocol package is missing
    root, notes = store.root, []
    if root.exists() and not root.is_dir():
        raise InputError(f"artifact store {store.location} is a file, not a folder; pass --store the folder "
                         "runs write to (artifact_store / $OLIVEFLOW_ARTIFACT_STORE)")
    if not root.exists():
        if must_exist and store.fs is None:
            raise InputError(f"artifact store {store.location} does not exist; pass --store the folder runs "
                             "write to (artifact_store / $OLIVEFLOW_ARTIFACT_STORE)")
        notes.append(f"no store at {root} yet")
    if store.fs is not None:
        notes.append(f"{store.location} is a URL store: only this host's copy at {root} is examined and pruned; "
                     "the objects at the URL are not touched")

    records_dir, records_complete, note = _records_location(prefect_storage)
    notes += [note] if note else []
    registered, sources, registry_note = _registered(home, settings.mlflow_tracking_uri)
    notes += [registry_note] if registry_note else []

    scratch = [entry for parent in [root, *_stage_dirs(root)] for entry in _scratch(parent)]
    slots = {(a.stage, a.key): a for a in _artifacts(root, verify)}
    records = [_record(path, root, slots, store.fs is not None) for path in _files(records_dir)]
    kept = _kept(root, slots, records, registered, sources)
    artifacts = [a.model_copy(update={"kept_by": kept.get((a.stage, a.key), [])}) for a in slots.values()]

    locks_dir = None
    if settings.lock_url:
        notes.append("cache-key locks are in Redis ($OLIVEFLOW_LOCK_URL): no lock files to examine")
    else:
        locks_dir = Path(settings.lock_dir or home / "locks").expanduser().resolve()
    locks = [LockEntry(path=path, held=lock_is_held(path)) for path in _files(locks_dir) if path.suffix == ".lock"]

    inside_home = root == home or home in root.parents
    olive = _olive_leftovers([home] if inside_home else [home, root], {s.path for s in scratch if s.stale})
    scratch = [s.model_copy(update={"olive_bytes": sum(o.bytes for o in olive if s.path in o.path.parents)})
               for s in scratch]
    folders = {p.name: _du(p) for p in sorted(home.iterdir()) if p.is_dir()} if home.is_dir() else {}
    return CacheReport(store=store.location, root=root, is_url=store.fs is not None, verified=verify, home=home,
                       records_dir=records_dir, locks_dir=locks_dir, records_complete=records_complete,
                       registry_read=registered is not None, artifacts=artifacts, scratch=scratch, records=records,
                       locks=locks, olive=olive, home_folders=folders, notes=notes)


def _records_location(prefect: Path | PrefectRecords | None) -> tuple[Path | None, bool, str | None]:
    """Where Prefect's cache records for local runs are, and whether they are all there is."""
    if prefect is None:
        return None, False, "Prefect's cache records were not located: artifacts with no record are kept"
    if not isinstance(prefect, PrefectRecords):
        return Path(prefect).expanduser().resolve(), True, None
    folder = Path(prefect.local_storage_path).expanduser().resolve()
    if prefect.elsewhere:
        return folder, False, (f"{' and '.join(prefect.elsewhere)} set: cache records may live outside {folder}, so "
                               "artifacts with no record here are kept (unset them to prune those when runs here are "
                               "local)")
    return folder, True, None


def _registered(home: Path, tracking_uri: str | None) -> tuple[dict[str, str] | None, dict[str, str], str | None]:
    """(content hash -> "name vN", source -> "name vN") of the MLflow registry's versions; None when not readable.

    Read from its SQLite file directly (read-only): no MLflow import, and no database is created where none is."""
    uri = tracking_uri or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    if not uri.startswith("sqlite:///"):
        return None, {}, (f"the model registry at {public_uri(uri)} is not read here: every export artifact (and "
                          "what it was built from) is kept")
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_file():
        return {}, {}, None
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
            tags = con.execute("SELECT name, version, value FROM model_version_tags WHERE key = ?",
                               (CONTENT_TAG,)).fetchall()
            sources = con.execute("SELECT name, version, source, storage_location FROM model_versions").fetchall()
    except sqlite3.Error as exc:
        if "no such table" in str(exc):  # a database MLflow never initialised: no versions
            return {}, {}, None
        return None, {}, (f"the model registry {db} cannot be read ({exc}): every export artifact (and what it was "
                          "built from) is kept")
    return ({value: f"{name} v{version}" for name, version, value in tags},
            {where: f"{name} v{version}" for name, version, *places in sources for where in places if where}, None)


def _stage_dirs(root: Path) -> list[Path]:
    return [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []


def _artifacts(root: Path, verify: bool) -> list[ArtifactEntry]:
    found = []
    for stage_dir in _stage_dirs(root):
        for folder in sorted(stage_dir.iterdir()):
            if not folder.is_dir() or not _KEY.fullmatch(folder.name):
                continue
            manifest, problem = _check(folder, verify)
            found.append(ArtifactEntry(stage=stage_dir.name, key=folder.name, path=folder, bytes=_du(folder),
                                       sha256=(manifest or {}).get("sha256"), problem=problem))
    return found


def _check(folder: Path, verify: bool) -> tuple[dict | None, str | None]:
    """(manifest, problem): problem is None for an intact artifact."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None, "no manifest (half-written or emptied)"
    except (OSError, ValueError):
        return None, "unreadable manifest"
    if not isinstance(manifest, dict):
        return None, "unreadable manifest"
    size = _du(folder, skip=MANIFEST)
    if size != manifest.get("size_bytes"):
        return manifest, f"holds {size} bytes, its manifest says {manifest.get('size_bytes')}"
    # Hashing is the store's own check (a local store over this folder: a URL store's remote is not contacted).
    if verify and ArtifactStore(folder.parent.parent).lookup(folder.parent.name, folder.name, verify=True) is None:
        return manifest, "content does not match its manifest's hashes"
    return manifest, None


def _scratch(parent: Path) -> list[ScratchEntry]:
    if not parent.is_dir():
        return []
    stale = set(stale_scratch(parent))
    entries = []
    for path in sorted(parent.iterdir()):
        if not path.name.startswith(SCRATCH_PREFIXES):
            continue
        if path.is_dir():
            entries.append(ScratchEntry(path=path, bytes=_du(path), stale=path in stale))
        elif path in stale:  # the lock file of a folder that is gone
            entries.append(ScratchEntry(path=path, bytes=_du(path), stale=True))
    return entries


def _files(folder: Path | None) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file()] if folder is not None and folder.is_dir() else []


def _record(path: Path, root: Path, slots: dict[tuple[str, str], ArtifactEntry], url_store: bool) -> RecordEntry:
    size = _du(path)
    try:
        artifact = _record_artifact(path)
    except (OSError, ValueError, KeyError, TypeError):
        # Named by a stage key, it is a damaged cache record (a run recomputes it); else some other Prefect
        # result, such as a failed task's pickled exception under a random name.
        return RecordEntry(path=path, bytes=size, status="unreadable" if _KEY.fullmatch(path.name) else "foreign")
    slot = None if artifact is None else _slot(artifact, root)
    if slot is None:
        return RecordEntry(path=path, bytes=size, artifact=artifact and Path(artifact), status="foreign")
    entry = slots.get(slot)
    if entry is not None and entry.problem is None:
        status = "ok"
    else:  # a URL store's record stays good while the URL holds the artifact: this host re-downloads its copy
        status = "remote" if url_store else "orphan"
    return RecordEntry(path=path, bytes=size, artifact=root.joinpath(*slot), status=status)


def _record_artifact(path: Path) -> str | None:
    """The artifact path in a Prefect ResultRecord file (``{"metadata": ..., "result": "<the JSON serializer's
    text>"}``) of an oliveflow stage result; None for any other result. Raises when the file is not a record."""
    result = json.loads(path.read_bytes())["result"]
    result = json.loads(result) if isinstance(result, str) else result
    if not isinstance(result, dict) or not str(result.get("__class__", "")).startswith("oliveflow.results."):
        return None
    artifact = (result.get("data") or {}).get("artifact")
    return artifact["path"] if isinstance(artifact, dict) and isinstance(artifact.get("path"), str) else None


def _slot(text: str, root: Path) -> tuple[str, str] | None:
    """(stage, key) of the artifact a path points into, when it is inside the store at ``root``."""
    if not os.path.isabs(text):
        return None
    try:
        parts = Path(text).relative_to(root).parts
    except ValueError:
        return None
    if len(parts) >= 2 and not parts[0].startswith(".") and _KEY.fullmatch(parts[1]):
        return parts[0], parts[1]
    return None


def _paths_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _paths_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _paths_in(item)


def _reads(entry: ArtifactEntry, root: Path) -> set[tuple[str, str]]:
    """The store artifacts an artifact names in its own small JSON files (its Olive config, its result)."""
    names = set()
    for path in sorted(entry.path.glob("*.json")):
        if path.name == MANIFEST or _du(path) > _SMALL_JSON:
            continue
        with contextlib.suppress(OSError, ValueError):
            names |= {slot for text in _paths_in(json.loads(path.read_text())) if (slot := _slot(text, root))}
    return names - {(entry.stage, entry.key)}


def _kept(root: Path, slots: dict[tuple[str, str], ArtifactEntry], records: list[RecordEntry],
          registered: dict[str, str] | None, sources: dict[str, str]) -> dict[tuple[str, str], list[str]]:
    """Why each kept artifact stays: the roots (records, registered versions), then what they read, transitively."""
    kept: dict[tuple[str, str], list[str]] = {}
    for record in records:
        if record.status == "ok":
            kept.setdefault(_slot(str(record.artifact), root), []).append(f"cache record {record.path.name[:12]}")
    for slot, entry in slots.items():
        if registered is None and entry.stage == "export":
            kept.setdefault(slot, []).append("export artifact; the registry was not read")
        elif registered and entry.sha256 in registered:
            kept.setdefault(slot, []).append(f"registered as {registered[entry.sha256]}")
    for source, version in sources.items():
        for text in (source, source.removeprefix("file://")):
            if (slot := _slot(text, root)) in slots:
                kept.setdefault(slot, []).append(f"source of registered {version}")
    queue = [slot for slot in kept if slot in slots]
    while queue:
        reader = queue.pop()
        for slot in sorted(_reads(slots[reader], root)):
            if slot in slots:
                queue += [slot] if slot not in kept else []
                kept.setdefault(slot, []).append(f"read by {reader[0]}/{reader[1][:12]}")
    return kept


def _olive_leftovers(tops: list[Path], stale: set[Path]) -> list[OliveLeftover]:
    found: dict[Path, OliveLeftover] = {}
    for top in tops:
        for dirpath, dirnames, _ in os.walk(top):
            for name in [d for d in dirnames if d in OLIVE_DIRS]:
                dirnames.remove(name)  # its inside is Olive's, counted as one
                path = Path(dirpath) / name
                found.setdefault(path, OliveLeftover(path=path, bytes=_du(path), where=_where(path, top, stale)))
    return sorted(found.values(), key=lambda o: o.path)


def _where(path: Path, top: Path, stale: set[Path]) -> str:
    for parent in path.parents:
        if parent in stale:
            return "stale scratch"
        if parent.name.startswith(SCRATCH_PREFIXES):
            return "in scratch"  # a writer holds it, or another store's: not judged here
        if (parent / MANIFEST).is_file():
            return "artifact"  # inside an artifact it is part of the content hash: removing it would damage it
        if parent == top:
            break
    return "loose"


def _du(path: Path, skip: str | None = None) -> int:
    """Bytes of the files under ``path`` (as ``hashing.tree_size`` counts them), tolerating files that vanish."""
    try:
        if not path.is_dir():
            return path.stat().st_size
    except OSError:
        return 0
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            if skip is not None and name == skip and dirpath == str(path):
                continue
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


# ---- plan ----

def prune_plan(report: CacheReport) -> list[PruneItem]:
    """What nothing needs any more, with the reason for each; removes nothing."""
    url_note = " (this host's copy; the store keeps its own)" if report.is_url else ""
    plan = [PruneItem(path=s.path, bytes=s.bytes, kind="scratch",
                      reason="stale scratch: left by a run that was killed" +
                             (f", {human(s.olive_bytes)} of it Olive's work" if s.olive_bytes else "")
                      if s.path.is_dir() else "lock file of a scratch folder that is gone")
            for s in report.scratch if s.stale]
    for a in report.artifacts:
        registered_source = any(why.startswith("source of registered") for why in a.kept_by)
        if a.problem is not None and not registered_source:  # a damaged folder a registered version is made of stays
            plan.append(PruneItem(path=a.path, bytes=a.bytes, kind="damaged", key=a.key, verify=report.verified,
                                  reason=f"damaged artifact: {a.problem}"))
        elif a.problem is None and not a.kept_by and report.records_complete:
            plan.append(PruneItem(path=a.path, bytes=a.bytes, kind="unreferenced", key=a.key,
                                  record=report.records_dir / a.key if report.records_dir else None,
                                  reason="unreferenced artifact: no cache record, read by no kept artifact, not "
                                         "registered" + url_note))
    plan += [PruneItem(path=r.path, bytes=r.bytes, kind="record", key=r.path.name,
                       reason="cache record whose artifact is gone" if r.artifact is None or not r.artifact.exists()
                       else "cache record whose artifact is damaged")
             for r in report.records if r.status == "orphan"]
    plan += [PruneItem(path=o.path, bytes=o.bytes, kind="olive", reason=f"Olive leftover ({o.path.name}) outside any "
                       "run's temp folder") for o in report.olive if o.where == "loose"]
    plan += [PruneItem(path=lock.path, bytes=lock.path.stat().st_size if lock.path.exists() else 0, kind="lock",
                       reason="cache-key lock file no process holds") for lock in report.locks if not lock.held]
    return plan


# ---- apply ----

_ORDER = ("scratch", "damaged", "unreferenced", "record", "olive", "lock")  # stale scratch first: see _drop


def apply(plan: list[PruneItem], locks=None) -> PruneOutcome:
    """Remove what ``plan`` lists, each item re-checked now; anything a living process holds is skipped.

    Artifacts and records are removed under their cache key's lock (``locks``: ``tasks.locking.lock_manager()``
    by default), taken without waiting, so a stage computing or reading that key keeps it; an artifact is moved
    aside into a scratch folder first, so a reader never finds it half-deleted."""
    if locks is None:
        from tasks.locking import lock_manager

        locks = lock_manager()
    removed, skipped = [], []
    stale: dict[Path, set[Path]] = {}
    for item in sorted(plan, key=lambda i: _ORDER.index(i.kind)):
        try:
            why = _remove(item, locks, stale)
        except OSError as exc:
            why = f"{type(exc).__name__}: {exc}"
        if why is None:
            removed.append(item)
        else:
            skipped.append(Skipped(item=item, why=why))
    return PruneOutcome(removed=removed, skipped=skipped)


def _remove(item: PruneItem, locks, stale: dict[Path, set[Path]]) -> str | None:
    """None when ``item`` was removed, else why not."""
    if item.kind == "scratch":
        parent = item.path.parent
        if parent not in stale:
            stale[parent] = set(stale_scratch(parent))
        if item.path not in stale[parent]:
            return "gone, or a living process holds it now"
        if item.path.is_dir():
            shutil.rmtree(item.path)
            Path(f"{item.path}.lock").unlink(missing_ok=True)
        else:
            item.path.unlink(missing_ok=True)
        return None
    if item.kind == "olive":
        if not item.path.is_dir():
            return "gone"
        shutil.rmtree(item.path)
        return None
    if item.kind == "lock":
        lock = FileLock(item.path, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return "a living process holds it now"
        try:  # removed while held: a process waiting on it finds the file unlinked and takes a new one
            item.path.unlink(missing_ok=True)
        finally:
            lock.release()
        return None
    with _key_lock(locks, item.key) as got:
        if not got:
            return f"a running stage holds cache key {item.key[:12]}"
        if not item.path.exists():
            return "gone"
        if item.kind == "record":
            artifact = _record_artifact(item.path)
            if artifact is not None and Path(artifact).is_dir() and _check(Path(artifact), False)[1] is None:
                return "its artifact is back"
            item.path.unlink()
            return None
        if item.kind == "damaged" and _check(item.path, item.verify)[1] is None:
            return "intact now"
        if item.kind == "unreferenced" and item.record is not None and item.record.is_file():
            return "a cache record points at it now"
        _drop(item.path)
        return None


def _drop(folder: Path) -> None:
    """Move the artifact into a held scratch folder, then delete it there. The scratch folder sweeps the stale
    scratch of ``folder.parent`` first (every scratch folder does): ``apply`` removes planned scratch before."""
    with scratch_dir(folder.parent, f".old-{folder.name[:12]}-") as trash:
        os.replace(folder, trash / "old")


@contextlib.contextmanager
def _key_lock(locks, key: str) -> Iterator[bool]:
    """The cache key's lock, taken without waiting; yields whether it was. A lock file made only for this is
    removed again (while held, which waiting processes survive), so pruning leaves no new lock files."""
    folder = getattr(locks, "lock_files_directory", None)
    lock_file = Path(folder) / f"{key}.lock" if folder is not None else None
    existed = lock_file is not None and lock_file.exists()
    holder = f"prune-{uuid.uuid4()}"
    if not locks.acquire_lock(key, holder=holder, acquire_timeout=0):
        yield False
        return
    try:
        yield True
    finally:
        try:
            if lock_file is not None and not existed:
                lock_file.unlink(missing_ok=True)
        finally:
            locks.release_lock(key, holder=holder)


# ---- text for people ----

def human(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def describe(report: CacheReport) -> str:
    """The report as a short table and the paths it looked at."""
    where = f"{report.store} (this host's copy: {report.root})" if report.is_url else str(report.root)
    lines = [f"artifact store  {where}", "",
             f"{'stage':<12} {'artifacts':>9} {'size':>10} {'damaged':>8} {'unreferenced':>14}"]
    rows = [(s.stage, s.artifacts, s.bytes, s.damaged, s.unreferenced, s.unreferenced_bytes) for s in report.stages]
    totals = ("all", *(sum(r[i] for r in rows) for i in range(1, 6)))
    for stage, count, size, damaged, loose, loose_bytes in [*rows, totals]:
        lines.append(f"{stage:<12} {count:>9} {human(size):>10} {damaged:>8} "
                     f"{f'{loose} ({human(loose_bytes)})' if loose else '0':>14}")
    stale = [s for s in report.scratch if s.stale]
    live = [s for s in report.scratch if not s.stale]
    olive_in_stale = [o for o in report.olive if o.where == "stale scratch"]
    records = {status: [r for r in report.records if r.status == status]
               for status in ("ok", "orphan", "remote", "foreign", "unreadable")}
    lines += ["",
              f"stale scratch    {len(stale)}, {human(sum(s.bytes for s in stale))}"
              + (f" (and {len(live)} in use by a running stage)" if live else ""),
              f"Olive leftovers  {len(report.olive)}, {human(sum(o.bytes for o in report.olive))}"
              + (f" ({len(olive_in_stale)} inside stale scratch)" if olive_in_stale else ""),
              f"cache records    {len(report.records)}, {human(sum(r.bytes for r in report.records))} in "
              f"{report.records_dir}: {len(records['orphan'])} point at a missing or damaged artifact, "
              f"{len(records['foreign'])} for other stores or tasks, {len(records['unreadable'])} unreadable"
              + (f", {len(records['remote'])} for artifacts this host has no intact copy of"
                 if records["remote"] else "")]
    if report.locks_dir is not None:
        lines.append(f"lock files       {len(report.locks)} in {report.locks_dir}, "
                     f"{sum(lock.held for lock in report.locks)} held")
    folders = ", ".join(f"{name} {human(size)}" for name, size in report.home_folders.items()) or "empty"
    lines += [f"home             {report.home}: {folders}", "",
              "checked: every file hashed" if report.verified else
              "checked: manifests and sizes (--verify hashes every file)"]
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def describe_plan(plan: list[PruneItem], report: CacheReport, outcome: PruneOutcome | None) -> str:
    lines = [f"{human(item.bytes):>10}  {item.reason}: {item.path}" for item in plan]
    lines.append(f"total: {len(plan)} items, {human(sum(item.bytes for item in plan))}" if plan
                 else "nothing to remove")
    lines += [f"note: {note}" for note in report.notes]
    if outcome is None:
        if plan:
            lines.append("dry run: nothing removed; add --apply")
    else:
        lines += [f"skipped {s.item.path}: {s.why}" for s in outcome.skipped]
        lines.append(f"removed {len(outcome.removed)} items, {human(outcome.freed_bytes)} freed")
    return "\n".join(lines)
