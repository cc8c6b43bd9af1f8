"""A store on a disk that fills up: a real tmpfs, mounted in a private mount namespace (``unshare``), so the
test needs no root on the host and leaves no mount behind."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import pytest

from runs import OLIVEFLOW, QUICK, REPO, run_env

UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]

# Run inside the namespace once the run has ended: what the full disk holds.
INSPECT = """
import json, sys
from pathlib import Path
from oliveflow.store import ArtifactStore
store = Path(sys.argv[1])
artifacts = [p for p in store.glob("*/*") if p.is_dir() and not p.name.startswith(".")]
print(json.dumps({
    "scratch": [str(p) for p in store.glob("*/.*")],
    "artifacts": [str(p) for p in artifacts],
    "intact": [str(p) for p in artifacts if ArtifactStore(store).lookup(p.parent.name, p.name) is not None],
}))
"""


def _namespaces_work() -> str | None:
    if shutil.which("unshare") is None:
        return "util-linux `unshare` is not installed"
    done = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True)
    return None if done.returncode == 0 else f"user+mount namespaces are not allowed here: {done.stderr.strip()}"


def test_a_full_store_fails_the_stage_in_one_line_and_leaves_nothing_partial(tiny_model_dir, tmp_path):
    reason = _namespaces_work()
    if reason:
        pytest.skip(f"cannot mount a private tmpfs: {reason}")
    mount, store = tmp_path / "small-disk", tmp_path / "small-disk" / "store"
    mount.mkdir()
    run = [*OLIVEFLOW, "run", "--model", str(tiny_model_dir), *QUICK, "--param", f"artifact_store={store}"]
    # 2 MB: the quantized tiny model alone is 1.6 MB, so the store fills up during the first stages.
    script = (f"mount -t tmpfs -o size=2m tmpfs {mount} && "
              f"{shlex.join(run)} 2> {tmp_path / 'run.err'}; rc=$?; "
              f"{shlex.join([sys.executable, '-c', INSPECT, str(store)])} > {tmp_path / 'inside.json'}; exit $rc")
    done = subprocess.run([*UNSHARE, "sh", "-c", script], cwd=REPO, text=True, capture_output=True, timeout=900,
                          env=run_env(tmp_path))
    stderr = (tmp_path / "run.err").read_text()
    assert done.returncode == 2, stderr[-3000:] + done.stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("oliveflow: error: ") and " is full (" in last, last
    assert "OLIVEFLOW_ARTIFACT_STORE" in last  # (Prefect's own log above it still shows the traceback)
    inside = json.loads((tmp_path / "inside.json").read_text())
    assert inside["scratch"] == [], "the failed stage's temp folder (and its lock file) were removed"
    assert inside["artifacts"] == inside["intact"], "every artifact left on the full disk is complete"
