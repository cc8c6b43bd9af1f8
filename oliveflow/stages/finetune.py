"""finetune: LoRA on the *quantized* model (Olive's LoRA pass + this project's QuantLinear layer).

The adapter is trained against exactly the int4 weights the export copies into ONNX, so
fine-tuning recovers part of the quantization loss instead of fitting weights that no
longer exist. Eval losses of the original, quantized and fine-tuned model are measured
on the held-out split with the same template.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from oliveflow import olive_runner
from oliveflow.olive_runner import jsonl_data_config
from oliveflow.config import FinetuneConfig
from oliveflow.results import Adapter, BaseModelRef, DataReport, QuantizedModel
from oliveflow.stages import artifact_of
from oliveflow.stages.data import read_examples, render

ADAPTER_SUBDIR = "adapter"


def olive_config(model: QuantizedModel, data: DataReport, template: str, config: FinetuneConfig) -> dict:
    lora = {
        "type": "QuantLoRA",
        "train_data_config": "train",
        "r": config.r,
        "alpha": config.alpha,
        "lora_dropout": config.dropout,
        "torch_dtype": _precision(config),
        "training_args": {
            "max_steps": config.max_steps,
            "learning_rate": config.learning_rate,
            "per_device_train_batch_size": config.batch_size,
            "gradient_checkpointing": config.gradient_checkpointing,
            "seed": config.seed,
            "data_seed": config.seed,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
        },
    }
    if config.target_modules:
        lora["target_modules"] = list(config.target_modules)
    return {
        "input_model": {"type": "HfModel", "model_path": str(model.model_dir)},
        "data_configs": [jsonl_data_config("train", data.train_path, template, config.max_seq_len,
                                           max_samples=max(data.rows, 1), batch_size=config.batch_size)],
        "passes": {"finetune": lora},
        "log_severity_level": 1,
    }


def _precision(config: FinetuneConfig) -> str:
    if config.precision != "auto":
        return config.precision
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def eval_loss(model, tokenizer, texts: list[str], max_seq_len: int) -> float:
    """Mean next-token loss over ``texts`` (token-weighted), as the Trainer computes it."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_seq_len)["input_ids"]
            if ids.shape[1] < 2:
                continue
            ids = ids.to(model.device)
            loss = model(input_ids=ids, labels=ids).loss.item()
            total += loss * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count if count else math.nan


def measure_eval_losses(base: BaseModelRef, model: QuantizedModel, adapter_dir: Path, texts: list[str],
                        max_seq_len: int) -> tuple[float, float, float]:
    from olive.model import HfModelHandler
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oliveflow.olive_ext import load_adapter

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model.model_dir)
    original = AutoModelForCausalLM.from_pretrained(base.artifact.path, dtype="auto").to(device)
    loss_original = eval_loss(original, tokenizer, texts, max_seq_len)
    del original
    tuned = load_adapter(HfModelHandler(model_path=str(model.model_dir)).load_model().to(device), adapter_dir)
    with tuned.disable_adapter():
        loss_quantized = eval_loss(tuned, tokenizer, texts, max_seq_len)
    loss_finetuned = eval_loss(tuned, tokenizer, texts, max_seq_len)
    return loss_original, loss_quantized, loss_finetuned


def finetune(base: BaseModelRef, model: QuantizedModel, data: DataReport, template: str, config: FinetuneConfig,
             out_dir: Path) -> Adapter:
    """Train a LoRA adapter on ``model`` into ``out_dir/adapter``; the Olive config is saved beside it."""
    started = time.perf_counter()
    produced = olive_runner.run_workflow(olive_config(model, data, template, config), out_dir, "finetune")
    # Olive writes a copy of the base next to the adapter; only the adapter is kept.
    shutil.move(str(Path(produced).parent / "adapter"), out_dir / ADAPTER_SUBDIR)
    olive_runner.cleanup(out_dir)
    adapter_dir = out_dir / ADAPTER_SUBDIR
    history = json.loads((adapter_dir / "log_history.json").read_text())
    train_loss = [float(entry["loss"]) for entry in history if "loss" in entry]

    losses: tuple[float | None, ...] = (None, None, None)
    if data.eval_path is not None:
        texts = [render(template, row) for row in read_examples(data.eval_path, data.fields)]
        losses = measure_eval_losses(base, model, adapter_dir, texts, config.max_seq_len)
    (out_dir / "eval_losses.json").write_text(json.dumps(dict(zip(("original", "quantized", "finetuned"), losses))))
    return Adapter(
        artifact=artifact_of(out_dir),
        train_loss=train_loss,
        eval_loss_original=losses[0],
        eval_loss_quantized=losses[1],
        eval_loss_finetuned=losses[2],
        seconds=time.perf_counter() - started,
    )
