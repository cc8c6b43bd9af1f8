"""SIGKILL to the whole process group of `oliveflow run` during each heavy stage in turn, then resume.

Real processes: each run is started in its own session and killed with ``os.killpg(..., SIGKILL)`` while its
stage's temp folder in the store is being filled, which is the only moment a kill can hurt. The reference is an
uninterrupted run into the same store path (the stages' Olive configs name their inputs' store paths, so the
path is part of what is hashed), removed before the interrupted runs start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from runs import HEAVY_STAGES, OLIVEFLOW, QUICK, REPO, half_written, run_env, stored


def _run(model: Path, root: Path, store: Path) -> dict:
    done = subprocess.run([*OLIVEFLOW, "run", "--model", str(model), "--json", *QUICK,
                           "--param", f"artifact_store={store}"], cwd=REPO, text=True, capture_output=True,
                          timeout=900, env=run_env(root))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _kill_during(stage: str, model: Path, root: Path, store: Path) -> None:
    """Start a run and SIGKILL its process group once ``stage`` has begun writing into the store."""
    proc = subprocess.Popen([*OLIVEFLOW, "run", "--model", str(model), *QUICK, "--param", f"artifact_store={store}"],
                            cwd=REPO, env=run_env(root), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(root / f"killed-in-{stage}.log", "w"))
    deadline, seen = time.monotonic() + 600, None
    while time.monotonic() < deadline and proc.poll() is None:
        scratch = [tmp for tmp in (store / stage).glob(".tmp-*") if tmp.is_dir()]
        seen = seen or (time.monotonic() if scratch else None)
        # The stage is writing its output (the smoke test writes its report at the end: it is computing).
        if any(any(tmp.iterdir()) for tmp in scratch) or (seen and time.monotonic() - seen > 0.2):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before {stage} started writing; see {root}/killed-in-{stage}.log"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_a_run_killed_in_each_heavy_stage_resumes_to_the_same_model(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    reference = _run(tiny_model_dir, tmp_path / "reference", store)
    expected = stored(store)
    assert set(expected) == set(HEAVY_STAGES)
    shutil.rmtree(store)

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for stage in HEAVY_STAGES:
        _kill_during(stage, tiny_model_dir, crashed, store)
        assert half_written(store) == [], "a kill never leaves a half-written artifact under its key"
        left = list((store / stage).glob(".tmp-*"))
        assert left, f"the kill landed while {stage} was writing (its temp folder is left for the next run)"
        done_before = HEAVY_STAGES[:HEAVY_STAGES.index(stage)]
        assert set(stored(store)) == set(done_before), "each killed run resumed from the last completed stage"

    resumed = _run(tiny_model_dir, crashed, store)
    assert {name: s["cache"] for name, s in resumed["stages"].items()} == {
        "quantize": "hit", "finetune": "hit", "export": "hit", "smoke_test": "miss"}
    final = stored(store)
    # The model, its adapter and every stage before them are bit-identical to the uninterrupted run's. The
    # smoke test's report holds wall-clock latencies, so its hash is not compared; its answers are.
    for stage in ("quantize", "finetune", "export"):
        assert final[stage] == expected[stage], stage
    assert resumed["samples"] == reference["samples"]
    assert resumed["response_perplexity"] == reference["response_perplexity"]
    # What the killed runs left (temp folders, their lock files) was swept when the stage was next written.
    assert not [p for p in store.rglob(".*") if p.name.startswith((".tmp-", ".old-", ".get-"))]
    assert half_written(store) == []


def test_damaged_artifacts_and_cache_records_are_recomputed_not_served(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    first = _run(tiny_model_dir, tmp_path, store)
    expected = stored(store)
    keys = {stage: next(iter(expected[stage])) for stage in HEAVY_STAGES}

    model = store / "export" / keys["export"] / "model" / "model.onnx"
    with open(model, "r+b") as f:
        f.truncate(model.stat().st_size // 2)
    weights = store / "finetune" / keys["finetune"] / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    weights.write_bytes(bytes(data))
    records = tmp_path / "prefect" / "storage"
    quantize_record = records / keys["quantize"]
    quantize_record.write_bytes(quantize_record.read_bytes()[:40])  # truncated
    (records / keys["smoke_test"]).write_bytes(b"\x00garbage\xff")
    (records / keys["export"]).unlink()  # missing

    second = _run(tiny_model_dir, tmp_path, store)
    assert {name: s["cache"] for name, s in second["stages"].items()} == {
        "quantize": "hit",      # record unreadable, artifact intact: served from the store, record rewritten
        "finetune": "miss",     # altered adapter: recomputed
        "export": "miss",       # truncated model: recomputed
        "smoke_test": "hit"}    # garbage record, intact report: served from the store
    assert stored(store) == expected, "the recomputed artifacts are the same as the damaged ones were"
    assert second["samples"] == first["samples"]
    for stage in HEAVY_STAGES:
        json.loads((records / keys[stage]).read_text())  # every record is whole again
