"""The README is executed: every ```bash block runs as written, in a fresh shell (bash, a bare PATH without the
virtual environment, a fresh HOME) from the repository root, and must succeed.

The comment lines right above a block say how it runs:

- ``<!-- readme-test: skip: REASON -->``: not run (installs, the whole suite, a GPU, the Hub), with the reason.
- ``<!-- readme-test: pipeline -->``: runs the pipeline (minutes cold); all such blocks share one fresh HOME, so
  the embedded model is built once. ``reduced: ARGS`` appends ARGS to each ``oliveflow run|stage`` line (fewer
  LoRA steps).
- ``<!-- readme-test: exit N; prints the next block -->``: must exit N and print exactly the next fenced block.
- no comment: a quick command.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
MARK = re.compile(r"<!-- readme-test: (.*?) -->")


@dataclass
class Block:
    line: int
    code: str
    marks: str
    after: str  # the next fenced block's text, for "prints the next block"

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"


def bash_blocks(text: str) -> list[Block]:
    fences = list(FENCE.finditer(text))
    blocks = []
    for index, fence in enumerate(fences):
        if fence.group(1) != "bash":
            continue
        above = text[: fence.start()].rstrip("\n").split("\n")
        marks = []
        while above and above[-1].startswith("<!--"):  # the comments right above (<!-- test-command --> too)
            found = MARK.fullmatch(above.pop().strip())
            if found:
                marks.append(found.group(1))
        after = fences[index + 1].group(2) if index + 1 < len(fences) else ""
        blocks.append(Block(text[: fence.start()].count("\n") + 1, fence.group(2), "; ".join(marks), after))
    return blocks


BLOCKS = bash_blocks(README.read_text())


def reduced(code: str, args: str) -> str:
    """``args`` appended to every ``oliveflow run``/``oliveflow stage`` command line of ``code`` (before its
    comment)."""
    lines = []
    for line in code.splitlines():
        command, hash_, comment = line.partition("  #")
        if re.search(r"\boliveflow (run|stage)\b", command) and not command.rstrip().endswith("\\"):
            line = f"{command.rstrip()} {args}" + (f"  {hash_.strip()}{comment}" if hash_ else "")
        lines.append(line)
    return "\n".join(lines) + "\n"


def shell(code: str, home: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pipeline_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme-home")


def test_the_readme_has_the_blocks_a_new_user_needs():
    kinds = {block.marks.split(":")[0].split(",")[0] for block in BLOCKS}
    assert {"skip", "pipeline", "exit 2; prints the next block", ""} <= kinds, kinds
    for block in BLOCKS:
        if "skip" not in block.marks:
            bare = [line for line in block.code.splitlines()
                    if re.match(r"\s*(oliveflow|python|pytest|mlflow|prefect)\b", line)]
            assert not bare, f"{block.id}: commands that need an activated venv: {bare}"


@pytest.mark.parametrize("block", [b for b in BLOCKS if not b.marks.startswith("pipeline")], ids=lambda b: b.id)
def test_readme_block(block, tmp_path):
    if block.marks.startswith("skip:"):
        pytest.skip(block.marks.removeprefix("skip:").strip())
    done = shell(block.code, tmp_path, timeout=180)
    expected = re.fullmatch(r"exit (\d+); prints the next block", block.marks)
    if expected:
        assert done.returncode == int(expected.group(1)), done.stderr
        assert done.stdout + done.stderr == block.after, "the README shows what the command prints"
    else:
        assert done.returncode == 0, f"{block.id}\n{block.code}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.marks.startswith("pipeline")], ids=lambda b: b.id)
def test_readme_pipeline_block(block, pipeline_home):
    args = re.search(r"reduced: (.*)$", block.marks)
    code = reduced(block.code, args.group(1)) if args else block.code
    done = shell(code, pipeline_home, timeout=1800)
    assert done.returncode == 0, f"{block.id}\n{code}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    if re.search(r"oliveflow run\s*(#.*)?$", code, re.M):  # the default run: its summary
        assert "Open the UIs:" in done.stdout and "run log:" in done.stdout


def test_reduced_appends_to_each_oliveflow_command():
    code = ".venv/bin/oliveflow stage quantize --output /tmp/q        # one stage\n.venv/bin/python x.py\n"
    assert reduced(code, "--max-steps 1") == (".venv/bin/oliveflow stage quantize --output /tmp/q --max-steps 1  "
                                              "# one stage\n.venv/bin/python x.py\n")
