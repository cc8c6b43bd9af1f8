"""Thin Prefect tasks over the stage functions: the artifact store, retries, artifacts.

Caching: each heavy stage's key (``Stage.key`` in oliveflow/stages/table.py) is a hash of its inputs' content
hashes, its canonical config, the versions of the libraries that shape its output and the store location.
The artifact store is the source of truth: the task is forced to recompute
(``refresh_cache``) whenever the store has no intact artifact under that key, so a Prefect
cache hit can never hand out a path that is gone or altered. Results Prefect persists are
the small manifests in ``oliveflow.results``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.results import get_result_store
from pydantic import BaseModel

from oliveflow import progress
from oliveflow.config import DataConfig, QuantizeConfig
from oliveflow.errors import StageError
from oliveflow.results import BaseModelRef, DataReport, StageRun
from oliveflow.stages.data import resolve_template, validate_data
from oliveflow.stages.model import resolve_model
from oliveflow.stages.table import STAGES, Stage
from oliveflow.store import RESULT_FILE, ArtifactStore, load_result
from tasks.locking import LockManager

R = TypeVar("R", bound=BaseModel)
log = logging.getLogger(__name__)


def _transient(task, task_run, state) -> bool:
    """Retry only what may pass on a second try (I/O hiccups), never bad input or a failed pass."""
    try:
        state.result()
    except (OSError, TimeoutError):  # ConnectionError too; InputError/StageError are not OSErrors
        return True
    except Exception:
        return False
    return False


def _key_from_parameters(context, parameters: dict[str, Any]) -> str:
    return parameters["key"]


# SERIALIZABLE: a run that needs a stage another process is computing under the same key waits for that
# process's lock, then is served from its record instead of computing the stage a second time. File locks
# serve one host; several hosts set $OLIVEFLOW_LOCK_URL to a Redis server (tasks/locking.py). The lock manager
# comes from the run's settings when the stage runs (``cache_policy``); the tasks are defined without one.
CACHE_POLICY = CacheKeyFnPolicy(cache_key_fn=_key_from_parameters)
CACHED = dict(cache_policy=CACHE_POLICY, persist_result=True, result_serializer="json",
              retries=1, retry_delay_seconds=5, retry_condition_fn=_transient)


def cache_policy(locks: LockManager) -> CacheKeyFnPolicy:
    """The stage tasks' cache policy, taking its key locks from ``locks`` (``tasks.locking.lock_manager``)."""
    return CACHE_POLICY.configure(isolation_level="SERIALIZABLE", lock_manager=locks)


def materialize(store: ArtifactStore, stage: str, key: str, result_type: type[R], build: Callable[[Path], R]) -> R:
    """Serve the stage's result from the store, or build it in a temp folder and rename it in."""
    if store.lookup(stage, key) is None:
        with store.write(stage, key) as tmp:
            (tmp / RESULT_FILE).write_text(build(tmp).model_dump_json(indent=1))
    return load_result(store.path(stage, key), result_type)


# ---- checks: cheap, always run, they produce the inputs of every key ----

@task(name="validate_data", cache_policy=NO_CACHE)
def validate_data_task(config: DataConfig) -> DataReport:
    return validate_data(config)


@task(name="resolve_model", cache_policy=NO_CACHE)
def resolve_model_task(spec: str, quantize_config: QuantizeConfig) -> BaseModelRef:
    return resolve_model(spec, quantize_config)


@task(name="resolve_template", cache_policy=NO_CACHE)
def resolve_template_task(config: DataConfig, base: BaseModelRef) -> str:
    return resolve_template(config, base.artifact.path)


# ---- heavy stages: cached on content, one task per row of the stage table ----

def _stage_task(stage: Stage):
    """``stage`` as a Prefect task named after it, cached on its ``key`` argument."""
    def run(key: str, store_url: str, inputs: dict[str, Any]) -> BaseModel:
        return materialize(ArtifactStore(store_url), stage.name, key, stage.result,
                           lambda out: stage.call(inputs, out))

    run.__name__ = run.__qualname__ = f"{stage.name}_task"  # Prefect's task key: one per stage
    return task(name=stage.name, **CACHED)(run)


STAGE_TASKS = {stage.name: _stage_task(stage) for stage in STAGES}


# ---- wiring helpers for flows ----

def run_stage(stage: Stage, store: ArtifactStore, locks: LockManager, values: dict[str, Any]) -> tuple[Any, StageRun]:
    """Run ``stage`` on the run's ``values`` (see the stage table) through its cached task, under ``locks``."""
    arguments = stage.arguments(values)
    with progress.task(stage.name) as work:  # start and end lines, progress on a console
        result, run = run_cached(STAGE_TASKS[stage.name], store, locks, stage.name,
                                 stage.key(store.location, arguments), inputs=arguments)
        work.outcome = "from the cache" if run.cache == "hit" else "computed"
    return result, run


def run_cached(task_fn, store: ArtifactStore, locks: LockManager, stage: str, key: str,
               **kwargs: Any) -> tuple[Any, StageRun]:
    """Call a cached stage task, its cache key locked by ``locks``; recompute when the store has no intact artifact
    for ``key``.

    Returns the result and how it was served: "hit" (Prefect record or intact store
    artifact, no computation) or "miss".
    """
    started = time.perf_counter()  # the stage's time includes checking (and for a URL store, fetching) its artifact
    intact = store.lookup(stage, key) is not None
    record = _record(task_fn, key)
    if record == "unreadable":
        # Perhaps read while another process was writing it: that process holds the key's lock until the record
        # is whole. Read again under the lock; unreadable then is damage, not a race.
        with _key_lock(locks, key):
            record = _record(task_fn, key)
    # Force a recompute when Prefect holds a record that cannot be read, or one whose artifact is gone or
    # altered (an intact artifact makes the "recompute" a read of it). With no record, the SERIALIZABLE
    # transaction decides: a run that waited for another process computing the same key gets that process's
    # record (state "Cached") instead of computing the stage again.
    refresh = record == "unreadable" or (record == "readable" and not intact)
    state = task_fn.with_options(cache_policy=cache_policy(locks), refresh_cache=refresh)(
        key=key, store_url=store.location, return_state=True, **kwargs)
    result = state.result()
    served = intact or state.name == "Cached"
    # A record written on another host points into that host's copy of the store: serve this host's copy
    # (for a URL store, the lookup downloads it).
    if not intact and store.lookup(stage, key, verify=False) is None:
        raise StageError(f"{stage}: the cache record for {key[:12]} has no artifact in {store.location}")
    result = load_result(store.path(stage, key), type(result))
    return result, StageRun(name=stage, cache="hit" if served else "miss", seconds=time.perf_counter() - started,
                            output_bytes=result.artifact.size_bytes if result.artifact else 0)


@contextlib.contextmanager
def _key_lock(locks: LockManager, key: str) -> Iterator[None]:
    holder = f"check-{uuid.uuid4()}"
    locks.acquire_lock(key, holder=holder)
    try:
        yield
    finally:
        locks.release_lock(key, holder=holder)


def _record(task_fn, key: str) -> str:
    """Prefect's cache record for ``key``: "none", "readable", or "unreadable" (truncated, altered, foreign)."""
    records = get_result_store().update_for_task(task_fn, _sync=True)
    if not records.exists(key):
        return "none"
    try:
        records.read(key)
    except Exception as exc:  # whatever the damage, the stage's store artifact is the truth: recompute the record
        log.warning("the cache record for %s cannot be read (%s); it is recomputed", key[:12], str(exc)[:200])
        return "unreadable"
    return "readable"
