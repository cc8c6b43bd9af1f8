"""Cold vs fully cached pipeline runs, side by side in one invocation.

    .venv/bin/python bench/bench_pipeline.py [--runs N] [-- extra `oliveflow run` args]

Each cold run uses a fresh $OLIVEFLOW_HOME and $PREFECT_HOME (so the embedded model is built, every stage
computed); the cached run repeats it in the same homes. Wall time and the peak resident memory of the whole
process tree (sampled every 50 ms) are recorded. Writes bench/results/pipeline-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_once(home: Path, extra: list[str]) -> dict:
    env = {**os.environ, "OLIVEFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    cmd = [str(Path(sys.executable).parent / "oliveflow"), "run", "--json", *extra]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    watcher = psutil.Process(proc.pid)

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, _tree_rss(watcher))
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"oliveflow run failed ({proc.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_seconds": round(wall, 2), "peak_rss_mb": round(peak / 2**20, 1),
            "stages": summary["stages"], "size_reduction": summary["size_reduction"],
            "eval_loss": summary.get("eval_loss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="cold+cached pairs")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="arguments passed to `oliveflow run` (after --)")
    args = parser.parse_args()
    pairs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="oliveflow-bench-") as tmp:
            cold = run_once(Path(tmp), args.extra)
            cached = run_once(Path(tmp), args.extra)
            pairs.append({"cold": cold, "cached": cached,
                          "cached_over_cold": round(cached["wall_seconds"] / cold["wall_seconds"], 4)})
    device = "gpu" if "gpu" in args.extra else "cpu"
    report = {
        "command": "oliveflow run --json " + " ".join(args.extra),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "pairs": pairs,
    }
    out = args.out or REPO / "bench" / "results" / f"pipeline-{device}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
