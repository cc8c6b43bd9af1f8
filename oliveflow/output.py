"""Publishing the final model folder to a user-chosen place, atomically."""

from __future__ import annotations

import shutil
from pathlib import Path

from oliveflow.errors import InputError
from oliveflow.store import staged_dir

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
    # No sweep: the target's parent is the user's folder, where a ".tmp-*" may be someone else's.
    with staged_dir(target, sweep=False) as staged:
        shutil.copytree(model_dir, staged, dirs_exist_ok=True)
        (staged / MARKER).write_text(str(model_dir) + "\n")
    return target
