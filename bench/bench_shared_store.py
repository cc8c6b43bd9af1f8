"""A second host served from shared object storage, side by side with computing and with a local cache.

    .venv/bin/python bench/bench_shared_store.py [-- extra `oliveflow run` args]

Starts Azurite (blob storage; .ci/install-azurite.sh installs it) on a free port, then runs
``oliveflow run --json`` four times, each in its own process:

- ``local_cold``: fresh home, the local artifact store (the single-machine default);
- ``shared_cold``: fresh home ("host A"), artifact store ``az://bench/<id>``: computes every stage and uploads it;
- ``shared_other_host``: another fresh home ("host B"), same store: downloads every stage's artifact (all hits);
- ``shared_cached``: host A again: its local copy is intact, the store only answers for the manifests.

MLflow tracking and registration are off, so the runs time the pipeline and the store. The embedded model is
built once beforehand and passed as ``--model``, so no run pays for building it. Writes
bench/results/shared-store-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import uuid
from pathlib import Path

import psutil

from bench_pipeline import run_once

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from services import Azurite, azurite_binary  # noqa: E402  (the tests' Azurite runner)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "shared-store-cpu.json")
    parser.add_argument("extra", nargs="*", help="arguments passed to `oliveflow run` (after --)")
    args = parser.parse_args()
    binary = azurite_binary()
    if binary is None:
        raise SystemExit("Azurite is not installed: run .ci/install-azurite.sh")

    with tempfile.TemporaryDirectory(prefix="oliveflow-bench-shared-") as tmp:
        root = Path(tmp)
        os.environ["OLIVEFLOW_HOME"] = str(root / "model-home")
        from oliveflow.tiny_model import ensure_tiny_model

        model = ensure_tiny_model()
        common = ["--model", str(model), "--param", "tracking.enabled=false", "--param", "registry.backend=none",
                  *args.extra]
        store = f"az://bench/{uuid.uuid4().hex[:8]}"
        with Azurite(binary, root / "azurite") as azurite:
            os.environ["AZURE_STORAGE_CONNECTION_STRING"] = azurite.connection_string
            shared = [*common, "--param", f"artifact_store={store}"]
            runs = {
                "local_cold": run_once(root / "local", common),
                "shared_cold": run_once(root / "host-a", shared),
                "shared_other_host": run_once(root / "host-b", shared),
                "shared_cached": run_once(root / "host-a", shared),
            }
        stored_mb = sum(f.stat().st_size for f in (root / "host-a" / "store-cache").rglob("*") if f.is_file()) / 2**20

    wall = {name: run["wall_seconds"] for name, run in runs.items()}
    report = {
        "command": "oliveflow run --json " + " ".join(common) + " [--param artifact_store=az://...]",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "artifacts_mb": round(stored_mb, 1),
        "runs": runs,
        "ratios": {
            "shared_cold_over_local_cold": round(wall["shared_cold"] / wall["local_cold"], 3),
            "other_host_over_shared_cold": round(wall["shared_other_host"] / wall["shared_cold"], 3),
            "shared_cached_over_shared_cold": round(wall["shared_cached"] / wall["shared_cold"], 3),
        },
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
