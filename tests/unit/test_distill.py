"""finetune.distill: the KL term's arithmetic, and the stage that trains a float teacher and learns from it."""

from __future__ import annotations

import math

import pytest
import torch

from oliveflow.distill import distilled_loss, kl_sum
from oliveflow.sft import IGNORE_INDEX


class _Fixed(torch.nn.Module):
    """A "model" whose logits are a parameter: the loss's gradient reaches it."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        return type("Out", (), {"logits": self.logits})()


def _cross_entropy(model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
    """The Trainer's compute_loss for a model that accepts loss kwargs: token sum / num_items_in_batch."""
    outputs = model(**inputs)
    labels = inputs["labels"][:, 1:]
    summed = torch.nn.functional.cross_entropy(outputs.logits[:, :-1].transpose(1, 2), labels.clamp(min=0),
                                               reduction="none")[labels != IGNORE_INDEX].sum()
    loss = summed / (num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE_INDEX).sum())
    return (loss, outputs) if return_outputs else loss


def _batch(vocab: int = 7):
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (2, 5))
    labels = ids.clone()
    labels[0, :2] = IGNORE_INDEX  # a prompt: not scored
    labels[1, :3] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_kl_sum_is_zero_for_the_same_logits_and_matches_its_definition():
    torch.manual_seed(1)
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    assert float(kl_sum(s, s, 1.0)) == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(t / 2, -1)
    expected = 4 * (p * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum()
    assert float(kl_sum(s, t, 2.0)) == pytest.approx(float(expected), rel=1e-5)
    assert float(kl_sum(s, t, 1.0)) > 0


def test_distilled_loss_mixes_cross_entropy_and_kl_on_the_scored_tokens_only():
    inputs = _batch()
    student, teacher = _Fixed(torch.randn(2, 5, 7)), _Fixed(torch.randn(2, 5, 7))
    ce = float(_cross_entropy(student, inputs))
    scored = inputs["labels"][:, 1:] != IGNORE_INDEX
    count = int(scored.sum())
    kl = float(kl_sum(student.logits[:, :-1][scored], teacher.logits[:, :-1][scored], 1.0)) / count
    assert float(distilled_loss(_cross_entropy, teacher, 0.0, 1.0)(student, inputs)) == pytest.approx(ce)
    assert float(distilled_loss(_cross_entropy, teacher, 1.0, 1.0)(student, inputs)) == pytest.approx(kl, rel=1e-5)
    mixed = float(distilled_loss(_cross_entropy, teacher, 0.25, 1.0)(student, inputs))
    assert mixed == pytest.approx(0.75 * ce + 0.25 * kl, rel=1e-5)
    # Accumulated micro-batches: both terms are divided by the whole batch's count the Trainer passes.
    halved = float(distilled_loss(_cross_entropy, teacher, 0.25, 1.0)(student, inputs, num_items_in_batch=2 * count))
    assert halved == pytest.approx(mixed / 2, rel=1e-5)
    # Logits at unscored positions (the prompt, and the last one) change nothing.
    changed = teacher.logits.detach().clone()
    changed[0, 0] += 5.0
    changed[:, -1] += 5.0
    assert float(distilled_loss(_cross_entropy, _Fixed(changed), 1.0, 1.0)(student, inputs)) == pytest.approx(kl,
                                                                                                           rel=1e-5)


def test_distilled_loss_gradient_moves_the_student_to_the_teacher():
    inputs = _batch()
    student, teacher = _Fixed(torch.randn(2, 5, 7)), _Fixed(torch.randn(2, 5, 7))
    loss = distilled_loss(_cross_entropy, teacher, 1.0, 1.0)
    optimizer = torch.optim.SGD(student.parameters(), lr=2.0)
    first = float(loss(student, inputs))
    for _ in range(50):
        optimizer.zero_grad()
        loss(student, inputs).backward()
        optimizer.step()
    assert float(loss(student, inputs)) < 0.05 * first
    assert teacher.logits.grad is None  # the teacher is only read


def _kl_to_teacher(base, quantized, adapter, teacher_adapter, examples, pad) -> tuple[float, float]:
    """Mean per-token KL(teacher || student) on the scored tokens of ``examples``: with the adapter, and without."""
    from olive.model import HfModelHandler

    from oliveflow.distill import load_teacher
    from oliveflow.olive_ext import load_adapter
    from oliveflow.sft import pad_batch

    teacher = load_teacher(base.artifact.path, teacher_adapter, torch.float32, torch.device("cpu"))
    student = load_adapter(HfModelHandler(model_path=str(quantized.model_dir)).load_model(), adapter)
    batch = pad_batch(examples, pad)
    scored = batch["labels"][:, 1:] != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        t = teacher(**inputs).logits[:, :-1][scored]
        with student.disable_adapter():
            before = student(**inputs).logits[:, :-1][scored]
        after = student(**inputs).logits[:, :-1][scored]
    return float(kl_sum(after, t, 1.0)) / int(scored.sum()), float(kl_sum(before, t, 1.0)) / int(scored.sum())


def test_the_stage_trains_a_float_teacher_and_the_adapter_learns_its_predictions(chain, tmp_path):
    """With finetune.distill the stage trains the float LoRA first (kept in teacher/adapter, its held-out perplexity
    reported), and an adapter trained on the KL alone brings the int4 model's held-out predictions closer to the
    teacher's."""
    import json

    from transformers import AutoTokenizer

    from oliveflow.config import FinetuneConfig
    from oliveflow.olive_runner import CONFIG_FILE
    from oliveflow.sft import encode_rows
    from oliveflow.stages.data import read_examples
    from oliveflow.stages.finetune import TEACHER_SUBDIR, finetune

    base, quantized, data, template = chain["base"], chain["quantized"], chain["data"], chain["template"]
    assert FinetuneConfig().distill == 0.5  # on by default: the chain's adapter has its teacher
    assert math.isfinite(chain["adapter"].response_ppl_teacher)
    assert (chain["adapter"].artifact.path / TEACHER_SUBDIR / "adapter" / "adapter_config.json").is_file()
    # Distillation alone (the scales and the error init off), so the adapter runs on the quantize stage's model.
    distilled = finetune(base, quantized, data, template,
                         FinetuneConfig(max_steps=20, learning_rate=3e-3, precision="float32", distill=1.0,
                                        train_scales=False, init="standard"), tmp_path)
    teacher_adapter = tmp_path / TEACHER_SUBDIR / "adapter"
    assert (teacher_adapter / "adapter_config.json").is_file()
    assert not (tmp_path / TEACHER_SUBDIR / ".olive-work").exists()  # Olive's copy of the base: gone
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())["passes"]["finetune"]["distill"]
    assert saved == {"base": str(base.artifact.path), "adapter": f"{TEACHER_SUBDIR}/adapter", "weight": 1.0,
                     "temperature": 1.0}
    teacher_config = json.loads((tmp_path / TEACHER_SUBDIR / CONFIG_FILE).read_text())
    assert teacher_config["input_model"]["model_path"] == str(base.artifact.path)  # trained on the float model
    assert "distill" not in teacher_config["passes"]["finetune"]
    assert math.isfinite(distilled.response_ppl_teacher)
    assert distilled.response_ppl_teacher < distilled.response_ppl_original  # the teacher learned the task
    # With weight 1 the logged loss is the KL (near 0 here), not the labels' cross-entropy (about 6 here).
    assert max(distilled.train_loss) < 0.1 * math.log(distilled.response_ppl_finetuned)

    tokenizer = AutoTokenizer.from_pretrained(quantized.model_dir)
    examples, _ = encode_rows(tokenizer, template, read_examples(data.eval_path, data.fields), 128)
    after, before = _kl_to_teacher(base, quantized, distilled.adapter_dir, teacher_adapter, examples,
                                   tokenizer.pad_token_id or 0)
    assert after < 0.5 * before, (after, before)


def test_distill_is_validated_before_any_work():
    from pydantic import ValidationError

    from oliveflow.config import FinetuneConfig

    with pytest.raises(ValidationError, match="distill"):
        FinetuneConfig(distill=1.5)
    with pytest.raises(ValidationError, match="distill_temperature"):
        FinetuneConfig(distill_temperature=0)
