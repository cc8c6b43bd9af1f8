"""finetune: LoRA on the *quantized* model (Olive's LoRA pass + this project's QuantLinear layer).

The adapter is trained against exactly the int4 weights the export copies into ONNX, so
fine-tuning recovers part of the quantization loss instead of fitting weights that no
longer exist. The training examples go through this project's SFT transform (``oliveflow.sft``:
one example per sequence, special tokens once, loss on the response), registered with Olive as a
data component. Held-out losses of the original, quantized and fine-tuned model use the same
transform; any non-finite loss, in training or on held-out data, fails the stage. With ``finetune.distill``
the same LoRA is first trained on the float model, and the shipped adapter also learns that teacher's
predictions (``oliveflow.distill``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

from oliveflow import olive_runner, progress
from oliveflow.config import FinetuneConfig
from oliveflow.errors import StageError
from oliveflow.memory import DoesNotFit, ModelShape, TrainingPlan, plan_training
from oliveflow.results import Adapter, BaseModelRef, DataReport, QuantizedModel
from oliveflow.sft import HeldOutLoss, encode_rows, held_out_loss
from oliveflow.stages import artifact_of
from oliveflow.stages.data import read_examples

ADAPTER_SUBDIR = "adapter"
TUNED_MODEL_SUBDIR = "model"  # finetune.train_scales: the checkpoint with trained scales (Adapter.tuned_model_dir)
TEACHER_SUBDIR = "teacher"  # finetune.distill: the float LoRA, in teacher/adapter
ERROR_INIT_EXAMPLES = 16  # training examples the inputs' statistics are taken on (finetune.init error)
log = logging.getLogger(__name__)


def olive_config(model_dir: Path, data: DataReport, template: str, config: FinetuneConfig,
                 plan: TrainingPlan, error_init: dict | None = None, distill: dict | None = None) -> dict:
    lora = {
        "type": "QuantLoRA",
        "train_data_config": "train",
        "r": config.r,
        "alpha": config.alpha,
        "lora_dropout": config.dropout,
        "torch_dtype": _precision(config),
        "float_base": plan.float_base,
        "training_args": {
            "max_steps": config.max_steps,
            "learning_rate": config.learning_rate,
            "per_device_train_batch_size": plan.micro_batch_size,
            "gradient_accumulation_steps": plan.gradient_accumulation_steps,
            "gradient_checkpointing": plan.gradient_checkpointing,
            "dataloader_pin_memory": not plan.device.startswith("cpu"),  # pinned memory only helps a copy to a GPU
            "seed": config.seed,
            "data_seed": config.seed,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
        },
    }
    if config.target_modules:
        lora["target_modules"] = list(config.target_modules)
    if error_init:
        lora["error_init"] = error_init
    if distill:
        lora["distill"] = distill
    if config.train_scales:
        lora["train_scales"] = True
    return {
        "input_model": {"type": "HfModel", "model_path": str(model_dir)},
        "data_configs": [olive_runner.sft_data_config("train", data.train_path, model_dir, template,
                                                      config.max_seq_len, config.loss_on, plan.micro_batch_size)],
        "passes": {"finetune": lora},
        "log_severity_level": 1,
    }


def _precision(config: FinetuneConfig) -> str:
    if config.precision != "auto":
        return config.precision
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def plan_memory(model_dir: Path, weights_bytes: int, config: FinetuneConfig, longest_example: int,
                group_size: int = 32) -> TrainingPlan:
    """Micro-batch, accumulation, checkpointing and float base for this device's memory (``oliveflow.memory``);
    ``group_size``: the quantization's, for ``finetune.train_scales`` (-1: one group per output row)."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        budget = int(config.gpu_memory_gb * 2**30) if config.gpu_memory_gb else free
        device = torch.cuda.get_device_name() + (f", told {config.gpu_memory_gb:g} GiB" if config.gpu_memory_gb
                                                 else " (free memory)")
    else:
        import psutil

        budget = int(config.gpu_memory_gb * 2**30) if config.gpu_memory_gb else psutil.virtual_memory().available
        device = "cpu" + (f", told {config.gpu_memory_gb:g} GiB" if config.gpu_memory_gb else " (available RAM)")
    try:
        shape = ModelShape.from_folder(model_dir)
        return plan_training(shape, budget_bytes=budget,
                             weights_bytes=weights_bytes, batch_size=config.batch_size,
                             sequence_tokens=longest_example,
                             dtype_bytes=2 if _precision(config) == "bfloat16" else 4, lora_r=config.r,
                             device=device, checkpointing=config.gradient_checkpointing,
                             micro_batch_size=config.micro_batch_size, train_scales=config.train_scales,
                             group_size=group_size if group_size > 0 else shape.hidden)
    except DoesNotFit as exc:
        scales = ", turn finetune.train_scales off" if config.train_scales else ""
        raise StageError(f"finetune: {exc}; lower finetune.max_seq_len, finetune.r or finetune.micro_batch_size"
                         f"{scales}, or use a GPU with more memory") from None


@contextlib.contextmanager
def gpu_memory_cap(gib: float | None):
    """Cap this process's CUDA allocations at ``gib`` GiB (a smaller card, simulated); nothing without CUDA."""
    import torch

    if not gib or not torch.cuda.is_available():
        yield
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))
    try:
        yield
    finally:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)


def measure_held_out(base: BaseModelRef, model: QuantizedModel, adapter_dir: Path, examples: list[dict],
                     batch_size: int, budget_bytes: int, teacher_dir: Path | None = None,
                     tuned_dir: Path | None = None) -> tuple[HeldOutLoss, HeldOutLoss, HeldOutLoss, HeldOutLoss | None]:
    """Held-out losses of the original model, the quantized model, the quantized model + adapter (on ``tuned_dir``,
    the checkpoint with trained scales, when given), and the original model + teacher adapter (None without one).

    The original is evaluated in float32 when that copy takes at most 40% of ``budget_bytes``, else in
    bfloat16 (a large model on a small GPU), and it is loaded straight onto the device.
    """
    import torch
    from olive.model import HfModelHandler
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oliveflow.olive_ext import dequantize_once, load_adapter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pad = AutoTokenizer.from_pretrained(model.model_dir).pad_token_id or 0
    dtype = torch.float32 if 4 * base.parameters <= 0.4 * budget_bytes else torch.bfloat16
    if dtype != torch.float32:
        log.info("finetune: the original model is evaluated in bfloat16 (float32 would take %.1f GB of %.1f GB)",
                 4 * base.parameters / 1e9, budget_bytes / 1e9)
    original = AutoModelForCausalLM.from_pretrained(base.artifact.path, dtype=dtype, device_map=device)
    loss_original = held_out_loss(original, examples, pad, batch_size)
    loss_teacher = None if teacher_dir is None else held_out_loss(load_adapter(original, teacher_dir), examples, pad,
                                                                  batch_size)
    del original
    if device == "cuda":
        torch.cuda.empty_cache()
    quantized = dequantize_once(HfModelHandler(model_path=str(model.model_dir)).load_model().to(device))
    loss_quantized = held_out_loss(quantized, examples, pad, batch_size)
    if tuned_dir is not None:  # finetune.train_scales: the adapter runs on the checkpoint with the trained scales
        del quantized
        quantized = dequantize_once(HfModelHandler(model_path=str(tuned_dir)).load_model().to(device))
    loss_finetuned = held_out_loss(load_adapter(quantized, adapter_dir), examples, pad, batch_size)
    return loss_original, loss_quantized, loss_finetuned, loss_teacher


def _train(model_dir: Path, weights_bytes: int, data: DataReport, template: str, config: FinetuneConfig,
           longest_example: int, out_dir: Path, stage: str, error_init: dict | None = None,
           distill: dict | None = None, group_size: int = 32) -> tuple[Path, TrainingPlan]:
    """One Olive LoRA run on ``model_dir`` into ``out_dir/adapter``; Olive's copy of the base is not kept."""
    plan = plan_memory(model_dir, weights_bytes, config, longest_example, group_size)
    log.info("%s: %s", stage, plan.describe())
    with gpu_memory_cap(config.gpu_memory_gb):
        produced = olive_runner.run_workflow(olive_config(model_dir, data, template, config, plan, error_init, distill),
                                             out_dir, stage)
    shutil.move(str(Path(produced).parent / "adapter"), out_dir / ADAPTER_SUBDIR)
    olive_runner.cleanup(out_dir)
    return out_dir / ADAPTER_SUBDIR, plan


def finetune(base: BaseModelRef, model: QuantizedModel, data: DataReport, template: str, config: FinetuneConfig,
             out_dir: Path) -> Adapter:
    """Train a LoRA adapter on ``model`` into ``out_dir/adapter``; the Olive config is saved beside it.

    With ``finetune.distill``, the same LoRA is first trained on the float model into ``out_dir/teacher/adapter``
    and the shipped adapter learns from it too (``oliveflow.distill``).
    """
    from transformers import AutoTokenizer

    started = time.perf_counter()
    config = config.for_model(base.parameters)  # learning rate and alpha left empty: chosen by model size
    tokenizer = AutoTokenizer.from_pretrained(model.model_dir)
    train, stats = encode_rows(tokenizer, template, read_examples(data.train_path, data.fields),
                               config.max_seq_len, config.loss_on)
    if stats.warning(config.max_seq_len):
        log.warning("finetune: %s", stats.warning(config.max_seq_len))
    if stats.dropped == stats.examples:
        raise StageError(f"finetune: no training example keeps a response token within max_seq_len="
                         f"{config.max_seq_len}; raise finetune.max_seq_len")
    longest = max(len(e["input_ids"]) for e in train)
    weights_bytes = model.size_after_bytes
    teacher_dir = distill = None
    if config.distill:
        with progress.task("float LoRA, the distillation teacher (finetune.distill)"):
            teacher_dir, _ = _train(base.artifact.path, base.artifact.size_bytes, data, template,
                                    config.model_copy(update={"train_scales": False}), longest,
                                    out_dir / TEACHER_SUBDIR, "finetune (float teacher)")
        distill = {"base": str(base.artifact.path), "adapter": str(teacher_dir), "weight": config.distill,
                   "temperature": config.distill_temperature}
        weights_bytes += base.parameters * (2 if _precision(config) == "bfloat16" else 4)  # the teacher's copy
    error_init = None
    if config.init == "error":
        # The statistics of each layer's inputs are taken on the first training examples.
        examples = out_dir / "init_examples.json"
        examples.write_text(json.dumps([e["input_ids"] for e in train[:ERROR_INIT_EXAMPLES]]))
        error_init = {"base": str(base.artifact.path), "model": str(model.model_dir), "examples": str(examples)}
    try:
        adapter_dir, plan = _train(model.model_dir, weights_bytes, data, template, config, longest, out_dir,
                                   "finetune", error_init, distill, model.group_size)
    finally:
        if error_init:
            Path(error_init["examples"]).unlink()
    tuned_dir = None
    if config.train_scales:
        from oliveflow.scale_gains import DELTAS_FILE, write_model

        tuned_dir = out_dir / TUNED_MODEL_SUBDIR
        write_model(model.model_dir, adapter_dir / DELTAS_FILE, tuned_dir)
    history = json.loads((adapter_dir / "log_history.json").read_text())
    train_loss = [float(entry["loss"]) for entry in history if "loss" in entry]

    losses: tuple[HeldOutLoss | None, ...] = (None, None, None, None)
    if data.eval_path is not None:
        examples, _ = encode_rows(tokenizer, template, read_examples(data.eval_path, data.fields),
                                  config.max_seq_len, config.loss_on)
        with gpu_memory_cap(config.gpu_memory_gb):
            losses = measure_held_out(base, model, adapter_dir, examples, plan.micro_batch_size,
                                      int(plan.budget_gb * 1e9), teacher_dir, tuned_dir)
        bad = [name for name, loss in zip(("original", "quantized", "fine-tuned", "teacher"), losses)
               if loss is not None and not (math.isfinite(loss.loss) and math.isfinite(loss.response_loss))]
        if bad:
            raise StageError(f"finetune: held-out loss of the {', '.join(bad)} model is not finite "
                             f"({losses}); the model is numerically broken, nothing is kept")
    report = {name: None if loss is None else {"loss": loss.loss, "response_loss": loss.response_loss,
                                               "response_perplexity": loss.response_perplexity,
                                               "response_tokens": loss.response_tokens}
              for name, loss in zip(("original", "quantized", "finetuned", "teacher"), losses)}
    (out_dir / "eval_losses.json").write_text(json.dumps(report, indent=1))

    def value(i: int, attr: str) -> float | None:
        return None if losses[i] is None else getattr(losses[i], attr)

    return Adapter(
        artifact=artifact_of(out_dir),
        train_loss=train_loss,
        loss_on=config.loss_on,
        train_examples=stats.examples - stats.dropped,
        truncated_examples=stats.truncated,
        eval_loss_original=value(0, "loss"),
        eval_loss_quantized=value(1, "loss"),
        eval_loss_finetuned=value(2, "loss"),
        response_ppl_original=value(0, "response_perplexity"),
        response_ppl_quantized=value(1, "response_perplexity"),
        response_ppl_finetuned=value(2, "response_perplexity"),
        response_ppl_teacher=value(3, "response_perplexity"),
        plan=plan.to_dict(),
        seconds=time.perf_counter() - started,
    )
