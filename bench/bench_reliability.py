"""Start-up on an idle and a busy machine, and concurrent runs against one run, side by side in one invocation.

    .venv/bin/python bench/bench_reliability.py

Every case starts `oliveflow run` cold (fresh $OLIVEFLOW_HOME and $PREFECT_HOME) on one tiny model built once,
with the fewest steps that run every stage, MLflow tracking and the MLflow registry on:
- start-up: seconds from the process start to Prefect's "Beginning flow run" line, idle and with two busy loops
  per core (bounded, stopped by the script);
- one run alone; four identical runs started together (one home); two runs with different inputs together.
Writes bench/results/reliability-cpu.json.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = [sys.executable, "-m", "oliveflow.cli", "run", "--json", "--quantize", "rtn", "--max-steps", "2",
       "--param", "smoke_test.num_samples=1", "--param", "smoke_test.max_new_tokens=4"]


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    return {**env, "PREFECT_HOME": str(root / "prefect"), "OLIVEFLOW_HOME": str(root / "home")}


def _start(model: Path, root: Path, extra: list[str], name: str) -> tuple[subprocess.Popen, Path]:
    root.mkdir(parents=True, exist_ok=True)
    err = root / f"{name}.err"
    proc = subprocess.Popen([*RUN, "--model", str(model), *extra], cwd=REPO, env=_env(root), text=True,
                            stdout=subprocess.PIPE, stderr=open(err, "w"))
    return proc, err


def _finish(procs: list[tuple[subprocess.Popen, Path]]) -> list[dict]:
    results = []
    for proc, err in procs:
        out = proc.communicate(timeout=3600)[0]
        if proc.returncode != 0:
            raise SystemExit(f"run failed (rc {proc.returncode}); see {err}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def startup_seconds(model: Path, root: Path) -> float:
    """Seconds until the flow run begins: the temporary Prefect server is up and its database created."""
    started = time.perf_counter()
    proc, err = _start(model, root, [], "startup")
    while "Beginning flow run" not in err.read_text():
        if proc.poll() is not None:
            raise SystemExit(f"run ended before its flow began; see {err}")
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    _finish([(proc, err)])
    return seconds


def together(model: Path, root: Path, extras: list[list[str]]) -> dict:
    started = time.perf_counter()
    results = _finish([_start(model, root, extra, f"run-{i}") for i, extra in enumerate(extras)])
    return {"runs": len(extras), "seconds": round(time.perf_counter() - started, 1),
            "stages_computed": {stage: sum(r["stages"][stage]["cache"] == "miss" for r in results)
                                for stage in results[0]["stages"]},
            "registrations": [r["registration"] for r in results]}


def main() -> None:
    from oliveflow.tiny_model import TinyModelParams, build_tiny_model

    scratch = Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    model = build_tiny_model([REPO / "data" / "travel_train.jsonl"], scratch / "tiny",
                             params=TinyModelParams(steps=40, num_threads=1))
    report: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()}}
    report["startup_idle_s"] = round(startup_seconds(model, scratch / "idle"), 1)
    loop = "import time\nend = time.time() + 900\nwhile time.time() < end:\n    pass\n"
    busy = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        time.sleep(5)
        report["load_average_at_busy_start"] = round(os.getloadavg()[0], 1)
        report["startup_busy_s"] = round(startup_seconds(model, scratch / "busy"), 1)
    finally:
        for proc in busy:
            proc.kill()
    report["one_run"] = together(model, scratch / "one", [[]])
    report["four_identical"] = together(model, scratch / "four", [[]] * 4)
    report["two_different"] = together(model, scratch / "two", [["--max-steps", "2"], ["--max-steps", "3"]])
    report["four_vs_one"] = round(report["four_identical"]["seconds"] / report["one_run"]["seconds"], 2)
    report["two_vs_one"] = round(report["two_different"]["seconds"] / report["one_run"]["seconds"], 2)
    out = REPO / "bench" / "results" / "reliability-cpu.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
