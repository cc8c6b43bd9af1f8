"""Distillation from the float LoRA (``finetune.distill``): the int4 model's adapter learns the float model's answers.

The finetune stage first trains the same LoRA on the float model (the teacher), then trains the adapter that ships
on the int4 model with a loss that mixes the usual next-token cross-entropy with the KL divergence from the
teacher's next-token distribution, on the same tokens the cross-entropy scores:

    loss = (1 - w) * CE(student, labels) + w * T^2 * KL(teacher_T || student_T)

where ``w`` is ``finetune.distill`` and ``_T`` means logits divided by the temperature ``T``. The teacher's full
distribution says, at every response token, which other tokens the float model found likely: far more to learn
from in 100 steps than the one token of the label (Hinton et al. 2015; for quantized students, LLM-QAT and
BitDistiller). Both terms are token sums divided by the same count (the Trainer's ``num_items_in_batch``), so
micro-batches with accumulation learn what one batch would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from oliveflow.sft import IGNORE_INDEX


def load_teacher(base_dir: Path, adapter_dir: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The float base with the teacher adapter merged in, frozen, in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.eval()
    model.requires_grad_(False)
    return model


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over rows of ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, in float32."""
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="sum")
    return kl * temperature ** 2


def distilled_loss(compute_loss: Callable, teacher: torch.nn.Module, weight: float, temperature: float) -> Callable:
    """``transformers.Trainer.compute_loss`` with the teacher's KL term mixed in (see the module docstring)."""

    def loss(model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None, **kwargs):
        ce, outputs = compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch,
                                   **kwargs)
        scored = inputs["labels"][:, 1:] != IGNORE_INDEX  # the positions whose next token the CE scores
        with torch.no_grad():
            teacher_logits = teacher(input_ids=inputs["input_ids"],
                                     attention_mask=inputs.get("attention_mask")).logits[:, :-1][scored]
        kl = kl_sum(outputs.logits[:, :-1][scored], teacher_logits, temperature)
        count = num_items_in_batch if num_items_in_batch is not None else scored.sum()
        total = (1 - weight) * ce + weight * kl / count
        return (total, outputs) if return_outputs else total

    return loss
