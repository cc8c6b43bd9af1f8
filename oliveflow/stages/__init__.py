"""Stage logic: plain functions of typed inputs to typed results, no Prefect imports."""

from __future__ import annotations

from pathlib import Path

from oliveflow.hashing import tree_size
from oliveflow.results import Artifact


def artifact_of(folder: Path) -> Artifact:
    """Describe a finished output folder (the store re-points the path when it renames it); its hash is the
    store's content hash, so a stage and the store name the same output alike."""
    from oliveflow.store import content_sha256

    return Artifact(path=Path(folder), sha256=content_sha256(folder), size_bytes=tree_size(folder))
