"""The result-storage block the deploy command makes: Prefect's cache records land where it says."""

from __future__ import annotations

from uuid import uuid4

from prefect import flow, task
from prefect.settings import PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, temporary_settings

from deployments.deploy import save_result_storage


def test_fsspec_result_storage_receives_the_cache_records():
    """Any fsspec URL (here memory://, standing in-process for s3:// or gs://) through a RemoteFileSystem block,
    picked up the way the deployments set it: PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK."""
    import fsspec

    bucket = f"memory://results-{uuid4().hex[:8]}"
    slug = save_result_storage(f"{bucket}/prefect")
    assert slug == "remote-file-system/oliveflow-results"
    key = f"oliveflow-test-{uuid4().hex}"

    @task(cache_key_fn=lambda *_: key, persist_result=True, result_serializer="json")
    def stage() -> dict:
        return {"answer": 42}

    @flow
    def run() -> tuple[str, str]:
        return stage(return_state=True).name, stage(return_state=True).name

    with temporary_settings(updates={PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: slug}):
        first, second = run()
    assert (first, second) == ("Completed", "Cached")
    records = fsspec.filesystem("memory").ls(f"{bucket}/prefect", detail=False)
    assert any(name.endswith(f"/prefect/{key}") for name in records), records
