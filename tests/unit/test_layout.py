"""The package's layout: every module of oliveflow/ imports alone (no import cycle), and none of them imports Prefect.

Each module is imported in a fresh interpreter of its own: in one shared interpreter an earlier import would
have loaded what a later one needs, which is how a cycle hides (``a`` works only because ``b`` was imported
first). The interpreters run in parallel, a few at a time.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import oliveflow

# Run in the child: import the one module, then name any Prefect module that came with it.
CHILD = """
import importlib, sys
importlib.import_module(sys.argv[1])
prefect = sorted(name for name in sys.modules if name == "prefect" or name.startswith("prefect."))
if prefect:
    sys.exit(f"imports Prefect ({', '.join(prefect[:5])}); pass the run's Prefect context in instead")
"""


def modules() -> list[str]:
    """Every module and package under oliveflow/, by name (found on disk, not imported)."""
    names = ["oliveflow"]
    for info in pkgutil.walk_packages(oliveflow.__path__, "oliveflow."):
        names.append(info.name)
    return sorted(names)


def _import_alone(name: str) -> str | None:
    done = subprocess.run([sys.executable, "-c", CHILD, name], capture_output=True, text=True, timeout=300,
                          cwd=Path(oliveflow.__file__).resolve().parent.parent)
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return f"{name}: {lines[-1] if lines else f'exit {done.returncode}'}"


def test_the_walk_finds_the_modules():
    found = modules()
    assert {"oliveflow.config", "oliveflow.lineage", "oliveflow.registry", "oliveflow.tracking",
            "oliveflow.stages.quantize"} <= set(found)


def test_every_module_imports_alone_without_prefect():
    names = modules()
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        problems = [p for p in pool.map(_import_alone, names) if p]
    assert not problems, "\n".join(problems)
