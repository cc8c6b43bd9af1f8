"""Content-addressed artifact store on a local folder.

Layout: ``<root>/<stage>/<key>/`` holds a stage's output plus ``oliveflow-manifest.json``
(the hash of everything else). Writers fill a temp folder beside it and rename it into
place, so a reader never sees half an artifact and a failed stage leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from typing import TypeVar

from pydantic import BaseModel

from oliveflow.errors import InputError
from oliveflow.hashing import tree_sha256, tree_size
from oliveflow.results import Artifact

MANIFEST = "oliveflow-manifest.json"
R = TypeVar("R", bound=BaseModel)


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str, verify: bool = True) -> Artifact | None:
        """The artifact stored under ``key``, or None when missing, half-written or altered."""
        folder = self.path(stage, key)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if verify and tree_sha256(folder, exclude=frozenset({MANIFEST})) != manifest.get("sha256"):
            return None
        return Artifact(path=folder, sha256=manifest["sha256"], size_bytes=manifest["size_bytes"])

    def write(self, stage: str, key: str) -> contextlib.AbstractContextManager[Path]:
        """Yield an empty temp folder; when the block succeeds it becomes the artifact for ``key``."""
        return atomic_dir(self.path(stage, key))


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
        if final.exists():
            # A stale or damaged artifact under the same name: move it aside, then drop it.
            trash = Path(tempfile.mkdtemp(prefix=f".old-{final.name[:12]}-", dir=final.parent))
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
