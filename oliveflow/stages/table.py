"""The stage table: each heavy stage's name, function, inputs, cache key and result type, in pipeline order.

Both wirings read it: the flow (flows/pipeline.py, through the Prefect tasks of tasks/stages.py) runs the
stages in this order, and ``oliveflow stage NAME`` (oliveflow/cli.py) runs any one of them. No Prefect here.

A run's values live in one namespace: the checks' results (``base``, ``data``, ``template``), each config
section under its stage's name (``quantize``, ``finetune``, ``export``, ``smoke_test``: see ``initial_values``),
and each stage's result under its ``output`` name (``quantized``, ``adapter``, ``onnx``, ``smoke``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from oliveflow.config import ExportConfig, FinetuneConfig, PipelineParams, QuantizeConfig, SmokeTestConfig
from oliveflow.hashing import config_sha256, file_sha256, library_versions
from oliveflow.results import Adapter, BaseModelRef, DataReport, OnnxModel, QuantizedModel, SmokeReport
from oliveflow.stages.export import export
from oliveflow.stages.finetune import finetune
from oliveflow.stages.quantize import quantize
from oliveflow.stages.smoke_test import smoke_test


@dataclass(frozen=True)
class Stage:
    name: str  # the store's folder, the cache key's "stage", the Prefect task's name, `oliveflow stage NAME`
    run: Callable[..., BaseModel]  # called with its inputs by keyword, plus ``out_dir`` when it ``writes``
    inputs: dict[str, str]  # the function's argument -> the name of a run value (see the module docstring)
    key_inputs: Callable[..., dict[str, Any]]  # the same arguments -> the inputs' part of the cache key
    result: type[BaseModel]
    output: str  # the name its result goes by: the next stages' input, the `oliveflow stage --FLAG DIR`
    writes: bool = True  # a folder: the store's artifact, or `oliveflow stage --output DIR`
    holds_gpu: bool = True  # False: holds the GPU only for a GPU export (ModelBuilder itself runs on the CPU)

    def arguments(self, values: dict[str, Any]) -> dict[str, Any]:
        return {argument: values[name] for argument, name in self.inputs.items()}

    def call(self, arguments: dict[str, Any], out_dir: Path) -> BaseModel:
        return self.run(**arguments, **({"out_dir": out_dir} if self.writes else {}))

    def key(self, store_location: str, arguments: dict[str, Any]) -> str:
        return stage_key(self.name, store_location, **self.key_inputs(**arguments))


def _quantize_key(base: BaseModelRef, config: QuantizeConfig, data: DataReport) -> dict[str, Any]:
    # awq and gptq calibrate, and the mixed-precision choice measures, on the data's fields (not the template);
    # plain rtn needs the model and config alone.
    calibrated = config.algorithm != "rtn" or config.size_budget is not None
    calibration = {"data": data.train_sha256, "fields": data.fields} if calibrated else None
    # What calibrates depends on the device that ran it (float32 sums in another order move AWQ's and GPTQ's
    # choices, and the plan's measured costs): a GPU's result is not served to a CPU run, nor the reverse.
    # Plain rtn gives the same codes on both (olive_ext.find_qparams) and shares one entry.
    return dict(model=base.artifact.sha256, config=config, calibration=calibration,
                device=quantize_device() if calibrated else None)


def quantize_device() -> str:
    """"cpu", or the CUDA device's name: where the quantize stage will run."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _finetune_key(base: BaseModelRef, model: QuantizedModel, data: DataReport, template: str,
                  config: FinetuneConfig) -> dict[str, Any]:
    return dict(base=base.artifact.sha256, model=model.artifact.sha256, data=data.train_sha256,
                eval=data.eval_sha256, template=template, config=config)


def _export_key(model: QuantizedModel, adapter: Adapter, config: ExportConfig) -> dict[str, Any]:
    return dict(model=model.artifact.sha256, adapter=adapter.artifact.sha256, config=config)


def _smoke_key(onnx: OnnxModel, base: BaseModelRef, data: DataReport, template: str,
               config: SmokeTestConfig) -> dict[str, Any]:
    return dict(onnx=onnx.artifact.sha256, base=base.artifact.sha256, data=data.eval_sha256 or data.train_sha256,
                template=template, config=config)


STAGES: tuple[Stage, ...] = (
    Stage("quantize", quantize, {"base": "base", "config": "quantize", "data": "data"}, _quantize_key,
          QuantizedModel, output="quantized"),
    Stage("finetune", finetune, {"base": "base", "model": "quantized", "data": "data", "template": "template",
                                 "config": "finetune"}, _finetune_key, Adapter, output="adapter"),
    Stage("export", export, {"model": "quantized", "adapter": "adapter", "config": "export"}, _export_key,
          OnnxModel, output="onnx", holds_gpu=False),
    Stage("smoke_test", smoke_test, {"onnx": "onnx", "base": "base", "data": "data", "template": "template",
                                     "config": "smoke_test"}, _smoke_key, SmokeReport, output="smoke",
          writes=False, holds_gpu=False),
)
BY_NAME = {stage.name: stage for stage in STAGES}
BY_OUTPUT = {stage.output: stage for stage in STAGES}


def initial_values(params: PipelineParams, base: BaseModelRef, data: DataReport, template: str) -> dict[str, Any]:
    """What the stages start from: the checks' results and each stage's config section."""
    sections = {stage.name: getattr(params, stage.name) for stage in STAGES}
    sections["finetune"] = params.finetune.for_model(base.parameters)  # empty lr/alpha: chosen by model size
    return {"base": base, "data": data, "template": template, **sections}


# ---- cache keys ----

@functools.cache
def code_sha256(stage: str) -> str:
    """Hash of the code that shapes a stage's output, so a fix to it invalidates old entries."""
    root = Path(__file__).resolve().parent.parent
    files = [root / "stages" / f"{stage}.py", root / "olive_ext.py", root / "olive_runner.py", root / "sft.py"]
    extra = {"quantize": ["awq.py", "precision.py", "tied_head.py", "lora_init.py"],
             "finetune": ["memory.py", "lora_init.py", "distill.py", "scale_gains.py"],
             "export": ["tied_head.py"],
             "smoke_test": ["mlflow_model.py"]}
    files += [root / name for name in extra.get(stage, [])]
    return config_sha256([file_sha256(f) for f in files])


def stage_key(stage: str, store_location: str, **inputs: Any) -> str:
    """A heavy stage's key: a hash of its inputs' content hashes, its canonical config, the versions of the
    libraries that shape its output, its code and the store location."""
    return config_sha256({"stage": stage, "store": store_location, "versions": library_versions(),
                          "code": code_sha256(stage), **inputs})
