"""Stage logic: plain functions of typed inputs to typed results, no Prefect imports."""

from __future__ import annotations

from pathlib import Path

from oliveflow.hashing import tree_sha256, tree_size
from oliveflow.results import Artifact


def artifact_of(folder: Path) -> Artifact:
    """Describe a finished output folder (the store re-points the path when it renames it)."""
    from oliveflow.store import MANIFEST

    return Artifact(path=Path(folder), sha256=tree_sha256(folder, exclude=frozenset({MANIFEST})),
                    size_bytes=tree_size(folder))
