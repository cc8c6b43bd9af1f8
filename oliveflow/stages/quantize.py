"""quantize: Olive's Rtn or Gptq pass, or this project's Awq / AwqGptq pass, into an Olive-quantized HF folder.

Before Olive runs, the mixed-precision plan (``oliveflow.precision``) measures which layers cost the most
response loss when quantized and keeps them at 8 bits within ``quantize.size_budget``. After it, a head
tied to the input embedding is tied back to its quantized grid (``oliveflow.tied_head``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from oliveflow import olive_runner
from oliveflow.config import QuantizeConfig
from oliveflow.errors import InputError
from oliveflow.hashing import tree_size
from oliveflow.olive_runner import jsonl_data_config, sft_data_config
from oliveflow.results import BaseModelRef, DataReport, QuantizedModel
from oliveflow.stages import artifact_of

if TYPE_CHECKING:  # torch: not imported where input is only checked (the CLI's refusals)
    from oliveflow.precision import PrecisionPlan

MODEL_SUBDIR = "model"
# Training examples the sensitivity of each layer is measured on (about 100 tokens each for chat data).
SENSITIVITY_EXAMPLES = 16
_PASSES = {"rtn": "Rtn", "gptq": "Gptq", "awq": "Awq", "awq+gptq": "AwqGptq"}
log = logging.getLogger(__name__)


def calibration_template(data: DataReport) -> str:
    """The data's fields as plain text: activation statistics barely depend on the chat template, and
    keeping it out means a template change does not re-run calibration."""
    return "\n".join("{" + name + "}" for name in data.fields)


def olive_config(base: BaseModelRef, config: QuantizeConfig, data: DataReport | None,
                 overrides: dict | None = None) -> dict:
    # lm_head too: ModelBuilder would otherwise re-quantize it to int4 on its own grid, and the
    # adapter would have been trained against a head the exported model does not have.
    if config.algorithm not in _PASSES:
        raise InputError(f"quantize.algorithm {config.algorithm!r} is unknown; use {', '.join(_PASSES)}")
    qpass = {"type": _PASSES[config.algorithm], "bits": config.bits, "group_size": config.group_size,
             "sym": config.symmetric, "lm_head": True}
    if overrides:
        qpass["overrides"] = overrides
    workflow: dict = {"input_model": {"type": "HfModel", "model_path": str(base.artifact.path)},
                      "log_severity_level": 1}
    if config.algorithm != "rtn":
        if data is None:
            raise InputError(f"quantize.algorithm {config.algorithm} needs calibration data; pass --data")
        # Calibrate on the project's own examples: Olive's default set is downloaded from the Hub.
        workflow["data_configs"] = [jsonl_data_config("calibration", data.train_path, calibration_template(data), 512,
                                                      config.calibration_blocks)]
        qpass["data_config"] = "calibration"
        if config.prompt_weight is not None and config.algorithm.startswith("awq"):
            # AWQ's search reads the examples one by one, with response labels, to weight its error by token.
            workflow["data_configs"].append(sft_data_config("awq_search", data.train_path, base.artifact.path,
                                                            calibration_template(data), 512, "response", 1))
            qpass.update(search_data_config="awq_search", prompt_weight=config.prompt_weight)
    workflow["passes"] = {"quantize": qpass}
    return workflow


def plan_precision(base: BaseModelRef, config: QuantizeConfig, data: DataReport) -> tuple[PrecisionPlan, dict]:
    """Measure each layer's cost at ``config.bits`` and choose the 8-bit ones within the size budget."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oliveflow import precision
    from oliveflow.sft import encode_rows, predicts_response
    from oliveflow.stages.data import read_examples
    from olive.common.quant.utils import WeightQuantizer
    from tqdm.auto import tqdm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(base.artifact.path)
    rows = read_examples(data.train_path, data.fields)[:SENSITIVITY_EXAMPLES]
    encoded, _ = encode_rows(tokenizer, calibration_template(data), rows, 512, "response")
    examples = [(torch.tensor([e["input_ids"]]), predicts_response(torch.tensor(e["labels"]))) for e in encoded]
    model = AutoModelForCausalLM.from_pretrained(base.artifact.path, dtype="auto", device_map=device)
    units = precision.units_of(model)
    quantizer = WeightQuantizer(bits=config.bits, symmetric=config.symmetric, group_size=config.group_size)
    with tqdm(total=len(units), desc="layer sensitivity", unit="layer") as bar:  # shown in the stage's line
        base_loss, costs, tokens = precision.measure_costs(model, examples, units, quantizer, bar.update)
    size16 = precision.size_16bit(model)
    fixed = precision.other_bytes(model, units, _was_tied(base))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the quantizer loads the model again
    budget = int(config.size_budget * size16)
    promoted, estimated, all_low = precision.choose(costs, units, low_bits=config.bits, group_size=config.group_size,
                                                    symmetric=config.symmetric, budget_bytes=budget,
                                                    fixed_bytes=fixed)
    plan = precision.PrecisionPlan(low_bits=config.bits, high_bits=precision.HIGH_BITS, budget_bytes=budget,
                                   size_16bit_bytes=size16, estimated_bytes=estimated, all_low_bytes=all_low,
                                   base_loss=base_loss, costs=costs, promoted=promoted, tokens=tokens)
    if all_low > budget:
        log.warning("quantize: the model takes %.1f MB with every layer at %d bits, over the size budget %.1f MB "
                    "(%.2f of %.1f MB at 16 bits); no layer keeps 8 bits. Raise quantize.size_budget or "
                    "quantize.group_size to meet it", all_low / 1e6, config.bits, budget / 1e6, config.size_budget,
                    size16 / 1e6)
    log.info("quantize: %d of %d units keep 8 bits (%s); estimated %.1f MB of a %.1f MB budget",
             len(promoted), len(units), ", ".join(promoted) or "none", estimated / 1e6, budget / 1e6)
    return plan, plan.overrides(units)


def quantize(base: BaseModelRef, config: QuantizeConfig, out_dir: Path, *,
             data: DataReport | None = None) -> QuantizedModel:
    """Quantize ``base`` into ``out_dir/model``; the Olive config (and the precision plan) is saved beside it."""
    from oliveflow import olive_ext  # noqa: F401  its find_qparams: the same scales on a GPU as on a CPU
    from oliveflow.tied_head import tie_embedding_to_head

    started = time.perf_counter()
    plan, overrides = None, None
    if config.size_budget is not None and config.bits < 8:
        if data is None:
            raise InputError("quantize.size_budget measures each layer on the training data; pass --data, or set "
                             "quantize.size_budget empty")
        plan, overrides = plan_precision(base, config, data)
    produced = olive_runner.run_workflow(olive_config(base, config, data, overrides), out_dir, "quantize")
    shutil.move(str(produced), out_dir / MODEL_SUBDIR)
    olive_runner.cleanup(out_dir)
    model_dir = out_dir / MODEL_SUBDIR
    tied_bytes = tie_embedding_to_head(model_dir) if _was_tied(base) else 0
    if plan is not None:
        (out_dir / "precision_plan.json").write_text(json.dumps(plan.to_dict(), indent=1))
    # A tied table is not shipped: the graph reads the head's codes.
    size = sum(tree_size(p) for p in model_dir.glob("*.safetensors")) - tied_bytes
    return QuantizedModel(
        artifact=artifact_of(out_dir),
        algorithm=config.algorithm,
        bits=config.bits,
        group_size=config.group_size,
        size_before_bytes=base.artifact.size_bytes,
        size_after_bytes=size,
        promoted=plan.promoted if plan else [],
        tied_embedding=tied_bytes > 0,
        seconds=time.perf_counter() - started,
    )


def _was_tied(base: BaseModelRef) -> bool:
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(base.artifact.path), "tie_word_embeddings", False))

