"""Helpers for the reliability tests: how `oliveflow run` is started, and what it leaves behind."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from oliveflow.store import MANIFEST

REPO = Path(__file__).resolve().parents[2]
OLIVEFLOW = [sys.executable, "-m", "oliveflow.cli"]
# The fewest steps that still run every stage.
QUICK = ["--quantize", "rtn", "--max-steps", "2", "--param", "smoke_test.num_samples=1",
         "--param", "smoke_test.max_new_tokens=4", "--param", "tracking.enabled=false",
         "--param", "registry.backend=none"]
HEAVY_STAGES = ("quantize", "finetune", "export", "smoke_test")


def run_env(root: Path, **extra: str) -> dict[str, str]:
    """A user's environment with its own Prefect home and oliveflow home under ``root`` (no server set)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env.update(PREFECT_HOME=str(root / "prefect"), OLIVEFLOW_HOME=str(root / "home"), **extra)
    return env


def stored(store: Path) -> dict[str, dict[str, str]]:
    """{stage: {key: content sha256}} of the artifacts in a local store (manifests only)."""
    found: dict[str, dict[str, str]] = {}
    for manifest in sorted(store.glob(f"*/*/{MANIFEST}")):
        found.setdefault(manifest.parent.parent.name, {})[manifest.parent.name] = json.loads(manifest.read_text())["sha256"]
    return found


def half_written(store: Path) -> list[Path]:
    """Folders in the store that look like artifacts but are not complete ones (scratch folders excluded)."""
    return [p for p in store.glob("*/*") if p.is_dir() and not p.name.startswith(".")
            and not (p / MANIFEST).is_file()]
