"""Several `oliveflow run` processes started together on one machine, as a user with four terminals would:
one home, a fresh store, the default MLflow store and registry (all created by the first of them)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from runs import OLIVEFLOW, QUICK, REPO, run_env, stored

TRACKED = [*QUICK, "--param", "tracking.enabled=true", "--param", "registry.backend=mlflow"]  # last one wins


def _start_together(model: Path, root: Path, extra: list[list[str]]) -> tuple[list[dict], float]:
    started = time.perf_counter()
    procs = [subprocess.Popen([*OLIVEFLOW, "run", "--model", str(model), "--json", *TRACKED, *args], cwd=REPO,
                              env=run_env(root), text=True, stdout=subprocess.PIPE,
                              stderr=open(root / f"run-{i}.err", "w"))
             for i, args in enumerate(extra)]
    outputs = [proc.communicate(timeout=1200)[0] for proc in procs]
    seconds = time.perf_counter() - started
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, (root / f"run-{i}.err").read_text()[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs], seconds


def _computed(runs: list[dict]) -> dict[str, int]:
    return {stage: sum(run["stages"][stage]["cache"] == "miss" for run in runs) for stage in runs[0]["stages"]}


@pytest.mark.slow
def test_four_identical_runs_compute_each_stage_once_and_agree(tiny_model_dir, tmp_path):
    runs, seconds = _start_together(tiny_model_dir, tmp_path, [[]] * 4)
    assert _computed(runs) == {"quantize": 1, "finetune": 1, "export": 1, "smoke_test": 1}
    first = runs[0]
    for run in runs[1:]:
        for field in ("onnx_model_dir", "samples", "response_perplexity", "rouge_l"):
            assert run[field] == first[field], field
    registered = [run["registration"] for run in runs if run["registration"].startswith("registered ")]
    assert len(registered) == 1, [run["registration"] for run in runs]
    assert all(run["registration"].startswith(("registered ", "already registered")) for run in runs)
    assert len({run["mlflow_run_id"] for run in runs}) == 4, "each run is tracked as its own MLflow run"
    assert all(len(keys) == 1 for keys in stored(tmp_path / "home" / "artifacts").values())
    print(f"\n4 identical runs together: {seconds:.1f} s, stages computed {_computed(runs)}")


def test_two_runs_with_different_inputs_proceed_side_by_side(tiny_model_dir, tmp_path):
    runs, seconds = _start_together(tiny_model_dir, tmp_path, [["--max-steps", "2"], ["--max-steps", "3"]])
    # Same base and quantize settings: quantize is shared, computed once; the rest differs.
    assert _computed(runs) == {"quantize": 1, "finetune": 2, "export": 2, "smoke_test": 2}
    assert runs[0]["onnx_model_dir"] != runs[1]["onnx_model_dir"]
    print(f"\n2 different runs together: {seconds:.1f} s")
