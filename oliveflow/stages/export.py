"""export: ModelBuilder int4 + ExtractAdapters -> an onnxruntime-genai folder and a .onnx_adapter file.

The base's int4 codes are copied from the quantized checkpoint (``QuantModelBuilder``),
never re-quantized (a tied embedding reads the head's codes, ``oliveflow.tied_head``); the LoRA weights stay float and are pulled out of the graph into
``adapter_weights.onnx_adapter`` so the model also runs with no adapter active.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from oliveflow import olive_runner
from oliveflow.config import ExportConfig
from oliveflow.errors import StageError
from oliveflow.results import Adapter, OnnxModel, QuantizedModel
from oliveflow.stages import artifact_of

MODEL_SUBDIR = "model"
ADAPTER_FILE = "adapter_weights.onnx_adapter"
_OLIVE_BOOKKEEPING = {"footprint.json", "output_footprint.json", "run_history.txt", "model_config.json"}
_PROVIDERS = {"cpu": ("cpu", "CPUExecutionProvider"), "gpu": ("gpu", "CUDAExecutionProvider")}


def olive_config(model: QuantizedModel, adapter: Adapter, config: ExportConfig) -> dict:
    device, provider = _PROVIDERS[config.device]
    return {
        "input_model": {"type": "HfModel", "model_path": str(adapter.tuned_model_dir or model.model_dir),
                        "adapter_path": str(adapter.adapter_dir)},
        "systems": {"local_system": {"type": "LocalSystem",
                                     "accelerators": [{"device": device, "execution_providers": [provider]}]}},
        "host": "local_system",
        "target": "local_system",
        "passes": {
            "build": {"type": "QuantModelBuilder", "precision": "int4"},
            "extract": {"type": "ExtractAdapters", "make_inputs": True, "dynamic_lora_r": True,
                        "save_format": "onnx_adapter"},
        },
        "log_severity_level": 1,
    }


def export(model: QuantizedModel, adapter: Adapter, config: ExportConfig, out_dir: Path) -> OnnxModel:
    """Export ``model`` + ``adapter`` into ``out_dir/model`` (flat genai folder)."""
    from oliveflow.tied_head import share_embedding_with_head

    started = time.perf_counter()
    produced = Path(olive_runner.run_workflow(olive_config(model, adapter, config), out_dir, "export"))
    produced_dir = produced if produced.is_dir() else produced.parent
    target = out_dir / MODEL_SUBDIR
    target.mkdir()
    for item in produced_dir.iterdir():
        if item.name not in _OLIVE_BOOKKEEPING:
            shutil.move(str(item), target / item.name)
    olive_runner.cleanup(out_dir)
    if model.tied_embedding and not share_embedding_with_head(target / "model.onnx"):
        raise StageError(f"export: the quantize stage tied the embedding to the head, but {target / 'model.onnx'} "
                         "holds no float embedding table equal to the head's codes; re-run the quantize stage")
    adapters = sorted(target.glob("*.onnx_adapter"))
    if not (target / "model.onnx").is_file() or not (target / "genai_config.json").is_file() or not adapters:
        raise StageError(f"export: Olive finished but {target} lacks model.onnx, genai_config.json or an "
                         f".onnx_adapter file (found: {sorted(p.name for p in target.iterdir())})")
    return OnnxModel(artifact=artifact_of(out_dir), adapter_name=adapters[0].name, device=config.device,
                     seconds=time.perf_counter() - started)
