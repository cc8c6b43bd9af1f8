"""Content hashes for files, folders and configs; the library versions that shape outputs."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel

_CHUNK = 1 << 20
# Libraries whose version changes what a stage writes (Olive's own cache ignores these).
SHAPING_LIBRARIES = ("olive-ai", "transformers", "torch", "peft", "onnxruntime", "onnxruntime-gpu",
                     "onnxruntime-genai", "onnxruntime-genai-cuda")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_files(root: Path, exclude: frozenset[str] = frozenset()) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] not in exclude)


def tree_sha256(root: Path, exclude: frozenset[str] = frozenset()) -> str:
    """Hash of a folder: relative paths and file contents, streamed (never a whole file in memory)."""
    root = Path(root)
    if root.is_file():
        return file_sha256(root)
    digest = hashlib.sha256()
    for path in tree_files(root, exclude):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def tree_size(root: Path) -> int:
    root = Path(root)
    return root.stat().st_size if root.is_file() else sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def canonical(value) -> str:
    """Stable JSON text for configs: sorted keys, pydantic models and paths as plain values."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def config_sha256(*values) -> str:
    return hashlib.sha256("\n".join(canonical(v) for v in values).encode()).hexdigest()


def library_versions(names: tuple[str, ...] = SHAPING_LIBRARIES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
