"""quantize: Olive's Rtn or Gptq pass, or this project's Awq pass, into an Olive-quantized HF folder."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from oliveflow import olive_runner
from oliveflow.olive_runner import jsonl_data_config
from oliveflow.config import QuantizeConfig
from oliveflow.errors import InputError
from oliveflow.hashing import tree_size
from oliveflow.results import BaseModelRef, DataReport, QuantizedModel
from oliveflow.stages import artifact_of

MODEL_SUBDIR = "model"


def calibration_template(data: DataReport) -> str:
    """The data's fields as plain text: activation statistics barely depend on the chat template, and
    keeping it out means a template change does not re-run calibration."""
    return "\n".join("{" + name + "}" for name in data.fields)


def olive_config(base: BaseModelRef, config: QuantizeConfig, data: DataReport | None) -> dict:
    # lm_head too: ModelBuilder would otherwise re-quantize it to int4 on its own grid, and the
    # adapter would have been trained against a head the exported model does not have.
    qpass = {"bits": config.bits, "group_size": config.group_size, "sym": config.symmetric, "lm_head": True}
    workflow: dict = {"input_model": {"type": "HfModel", "model_path": str(base.artifact.path)},
                      "log_severity_level": 1}
    if config.algorithm == "rtn":
        qpass["type"] = "Rtn"
    elif config.algorithm in ("gptq", "awq"):
        if data is None:
            raise InputError(f"quantize.algorithm {config.algorithm} needs calibration data; pass --data")
        # Calibrate on the project's own examples: Olive's default set is downloaded from the Hub.
        workflow["data_configs"] = [jsonl_data_config("calibration", data.train_path, calibration_template(data), 512,
                                                      config.calibration_blocks)]
        qpass.update(type="Gptq" if config.algorithm == "gptq" else "Awq", data_config="calibration")
    else:
        raise InputError(f"quantize.algorithm {config.algorithm!r} is unknown; use awq, rtn or gptq")
    workflow["passes"] = {"quantize": qpass}
    return workflow


def quantize(base: BaseModelRef, config: QuantizeConfig, out_dir: Path, *,
             data: DataReport | None = None) -> QuantizedModel:
    """Quantize ``base`` into ``out_dir/model``; the Olive config is saved beside it."""
    started = time.perf_counter()
    produced = olive_runner.run_workflow(olive_config(base, config, data), out_dir, "quantize")
    shutil.move(str(produced), out_dir / MODEL_SUBDIR)
    olive_runner.cleanup(out_dir)
    return QuantizedModel(
        artifact=artifact_of(out_dir),
        algorithm=config.algorithm,
        bits=config.bits,
        group_size=config.group_size,
        size_before_bytes=base.artifact.size_bytes,
        size_after_bytes=sum(tree_size(p) for p in (out_dir / MODEL_SUBDIR).glob("*.safetensors")),
        seconds=time.perf_counter() - started,
    )
