"""Publishing the final model folder to a user-chosen place, atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from oliveflow.errors import InputError

MARKER = ".oliveflow-output"


def check_output_dir(target: Path | None) -> None:
    """Refuse, before any work, to overwrite a folder that oliveflow did not write."""
    if target is None:
        return
    target = Path(target).expanduser()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MARKER).exists())):
        raise InputError(f"output {target} exists and was not written by oliveflow; "
                         "pass a new or empty folder (--output)")


def publish(model_dir: Path, target: Path) -> Path:
    """Copy ``model_dir`` to ``target`` through a temp folder beside it and a rename."""
    check_output_dir(target)
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        staged = tmp / "model"
        shutil.copytree(model_dir, staged)
        (staged / MARKER).write_text(str(model_dir) + "\n")
        if target.exists():
            os.replace(target, tmp / "previous")
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
