"""Run one Olive workflow config in-process, save it beside the output, fail loudly.

Olive 0.13 reports most pass failures as "No output model produced" and returns normally;
``run_workflow`` turns that into a ``StageError`` carrying the error Olive logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from oliveflow.errors import StageError

CONFIG_FILE = "olive_config.json"
PACKAGE_FILE = "olive_package_config.json"


class _ErrorCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = f"{text}: {type(exc).__name__}: {exc}"
        self.messages.append(text)


@contextlib.contextmanager
def _collect_olive_errors():
    collector = _ErrorCollector()
    logger = logging.getLogger("olive")
    logger.addHandler(collector)
    try:
        yield collector
    finally:
        logger.removeHandler(collector)


def _reason(messages: list[str]) -> str:
    interesting = [m for m in messages if "No output model produced" not in m]
    if not interesting:
        return "Olive produced no output model and logged no reason"
    return " | ".join(line.strip().splitlines()[-1] if "Traceback" in line else line.strip()
                      for line in interesting[-2:])


def jsonl_data_config(name: str, path: Path, template: str, max_seq_len: int, max_samples: int,
                      batch_size: int = 1) -> dict:
    """An Olive data config reading a local JSONL file through a text template (never the Hub)."""
    return {
        "name": name,
        "type": "HuggingfaceContainer",
        "load_dataset_config": {"data_name": "json", "data_files": [str(path)], "split": "train"},
        "pre_process_data_config": {"text_template": template, "max_seq_len": max_seq_len,
                                    "max_samples": max_samples},
        "dataloader_config": {"batch_size": batch_size},
    }


def sft_data_config(name: str, path: Path, model_dir: Path, template: str, max_seq_len: int, loss_on: str,
                    batch_size: int) -> dict:
    """An Olive data config: the JSONL file through this project's SFT transform (``olive_ext.sft_pre_process``)."""
    from oliveflow import olive_ext

    return {
        "name": name,
        "type": "HuggingfaceContainer",
        "user_script": olive_ext.__file__,  # registers the component when the config is re-run with `olive run`
        "load_dataset_config": {"data_name": "json", "data_files": [str(path)], "split": "train"},
        "pre_process_data_config": {"type": olive_ext.SFT_PRE_PROCESS, "model_name": str(model_dir),
                                    "template": template, "max_seq_len": max_seq_len, "loss_on": loss_on},
        "dataloader_config": {"batch_size": batch_size},
    }


WORK_DIR = ".olive-work"


def run_workflow(config: dict[str, Any], stage_dir: Path, stage: str) -> Path:
    """Run ``config`` with this project's passes; return the output model's path.

    ``stage_dir`` receives the resolved config (re-runnable with ``olive run --run-config
    olive_config.json --package-config olive_package_config.json``). Olive's cache and
    output go to ``stage_dir/.olive-work``: the caller moves what it keeps out of it and
    calls ``cleanup``, so no second copy of a model outlives the stage.
    """
    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
    from olive.workflows import run as olive_run

    from oliveflow import olive_ext

    work = stage_dir / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    package = olive_ext.package_config()
    # Saved with paths relative to the stage folder (re-run it from there): an absolute temp path would make two
    # identical runs' artifacts differ.
    saved = _relative_to({**config, "output_dir": f"{WORK_DIR}/output", "cache_dir": f"{WORK_DIR}/cache"}, stage_dir)
    (stage_dir / CONFIG_FILE).write_text(json.dumps(saved, indent=2, default=str))
    config = {**config, "output_dir": str(work / "output"), "cache_dir": str(work / "cache")}
    (stage_dir / PACKAGE_FILE).write_text(json.dumps(package, indent=2))

    with _collect_olive_errors() as errors:
        try:
            output = olive_run(config, package_config=package)
        except Exception as exc:  # Olive raises for config errors; keep its message
            raise StageError(f"{stage}: Olive failed: {type(exc).__name__}: {exc}") from exc
    if output is None or not output.has_output_model():
        raise StageError(f"{stage}: Olive produced no output model: {_reason(errors.messages)}")
    return Path(output.get_best_candidate().model_path)


def _relative_to(value: Any, folder: Path) -> Any:
    """``value`` with every string path inside ``folder`` made relative to it (dicts and lists walked)."""
    if isinstance(value, dict):
        return {k: _relative_to(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_to(v, folder) for v in value]
    if isinstance(value, str | Path) and Path(value).is_absolute() and Path(value).is_relative_to(folder):
        return str(Path(value).relative_to(folder))
    return value


def cleanup(stage_dir: Path) -> None:
    shutil.rmtree(stage_dir / WORK_DIR, ignore_errors=True)
