"""The supervised fine-tuning data transform, owned by this project (no Olive or Prefect imports).

One example is one sequence: ``[bos?] prompt-tokens response-tokens [eos?]``. The prompt is the
template rendered up to its last placeholder (exactly what the smoke test generates from), the
response is the rest. Special tokens are explicit and appear once: ``bos`` only where the tokenizer
itself would add it and the text does not already start with it, ``eos`` only where the text does
not already end with it. Labels are ``-100`` on the prompt when the loss is on the response only.
Examples are never packed together: batches are padded with an attention mask, so no token attends
across examples and every example's positions start at 0. Training and evaluation use this same
transform.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal

IGNORE_INDEX = -100
LossOn = Literal["response", "all"]
# Stand-ins rendered through a chat template, then turned into {field} placeholders.
_PROMPT_MARK, _RESPONSE_MARK = "\x00OLIVEFLOW_PROMPT\x00", "\x00OLIVEFLOW_RESPONSE\x00"


def render(template: str, row: dict) -> str:
    return template.format(**{k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()})


def split_template(template: str) -> tuple[str, str]:
    """(prompt part, response part): the template cut before its last ``{field}`` placeholder."""
    import string

    pieces = list(string.Formatter().parse(template))
    last = max((i for i, (_, name, _, _) in enumerate(pieces) if name is not None), default=None)
    if last is None:
        raise ValueError(f"template {template[:60]!r} has no {{field}} placeholders")

    # Rebuilt from the parsed pieces, not cut with rindex: a literal "{{name" after the last placeholder
    # would otherwise be taken for it and split an escaped brace pair.
    def source(literal: str, name: str | None, spec: str | None, conv: str | None) -> str:
        text = literal.replace("{", "{{").replace("}", "}}")
        if name is not None:
            text += "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        return text

    head = "".join(source(*piece) for piece in pieces[:last]) + source(pieces[last][0], None, None, None)
    tail = source("", *pieces[last][1:]) + "".join(source(*piece) for piece in pieces[last + 1:])
    return head, tail


def chat_format_template(tokenizer: Any, prompt_field: str, response_field: str) -> str | None:
    """The model's own chat template as a ``{field}`` format string (None when the tokenizer has none).

    One user turn holding ``{prompt_field}`` and one assistant turn holding ``{response_field}``, with
    whatever the template adds itself (a default system prompt, turn markers).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": _PROMPT_MARK}, {"role": "assistant", "content": _RESPONSE_MARK}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if text.count(_PROMPT_MARK) != 1 or text.count(_RESPONSE_MARK) != 1 or \
            text.index(_PROMPT_MARK) > text.index(_RESPONSE_MARK):
        return None
    text = text.replace("{", "{{").replace("}", "}}")
    return text.replace(_PROMPT_MARK, "{" + prompt_field + "}").replace(_RESPONSE_MARK, "{" + response_field + "}")


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # no response token left after the cut

    def warning(self, max_seq_len: int) -> str | None:
        if not self.truncated:
            return None
        return (f"{self.truncated} of {self.examples} examples are longer than max_seq_len={max_seq_len} tokens and "
                f"were cut ({self.dropped} dropped: no response token left); raise finetune.max_seq_len to keep them")


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_example(tokenizer: Any, template: str, row: dict, max_seq_len: int, loss_on: LossOn = "response",
                   stats: EncodeStats | None = None) -> dict | None:
    """``{"input_ids", "attention_mask", "labels", "response_start"}`` for one example; None if nothing is left
    to learn after cutting it to ``max_seq_len``."""
    head, tail = split_template(template)
    prompt_text, response_text = render(head, row), render(tail, row)
    prefix = []
    if _adds_bos(tokenizer) and not prompt_text.startswith(tokenizer.bos_token or "\x00"):
        prefix = [tokenizer.bos_token_id]
    prompt = prefix + tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token
    if tokenizer.eos_token_id is not None and not (eos and response_text.rstrip().endswith(eos)):
        response = response + [tokenizer.eos_token_id]
    ids = prompt + response
    if stats is not None:
        stats.examples += 1
    if len(ids) > max_seq_len:
        ids = ids[:max_seq_len]
        if stats is not None:
            stats.truncated += 1
    start = min(len(prompt), len(ids))
    labels = list(ids)
    if loss_on == "response":
        labels[:start] = [IGNORE_INDEX] * start
    if start >= len(ids) or len(ids) < 2:
        if stats is not None:
            stats.dropped += 1
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "response_start": start}


def encode_rows(tokenizer: Any, template: str, rows: Iterable[dict], max_seq_len: int, loss_on: LossOn = "response"
                ) -> tuple[list[dict], EncodeStats]:
    stats = EncodeStats()
    encoded = [encode_example(tokenizer, template, row, max_seq_len, loss_on, stats) for row in rows]
    return [e for e in encoded if e is not None], stats


def pad_batch(examples: list[dict], pad_id: int) -> dict:
    """Right-padded tensors with an attention mask (the same padding Olive's LoRA collator applies)."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)

    def padded(key: str, value: int) -> torch.Tensor:
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples])

    return {"input_ids": padded("input_ids", pad_id), "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", IGNORE_INDEX)}


@dataclass(frozen=True)
class HeldOutLoss:
    """Token-weighted mean next-token losses on held-out examples."""

    loss: float  # over the training labels (the transform's own loss)
    response_loss: float  # over response tokens only
    response_tokens: int

    @property
    def response_perplexity(self) -> float:
        return math.exp(self.response_loss) if math.isfinite(self.response_loss) else math.inf


def predicts_response(labels: Any) -> Any:
    """True at each position whose *next* token is a response token (the logits there are scored); ``labels`` are
    ``encode_example``'s as a tensor, IGNORE_INDEX outside the response."""
    import torch

    predicts = torch.zeros(labels.shape, dtype=torch.bool)
    predicts[..., :-1] = labels[..., 1:] != IGNORE_INDEX
    return predicts


def held_out_loss(model: Any, examples: list[dict], pad_id: int, batch_size: int = 8) -> HeldOutLoss:
    """Losses of ``model`` on encoded examples, from one forward pass per batch."""
    import torch

    device = next(model.parameters()).device
    total = response = 0.0
    n_total = n_response = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            batch = {k: v.to(device) for k, v in pad_batch(chunk, pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            per_token = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:].clamp(min=0), reduction="none")
            targets = batch["labels"][:, 1:] != IGNORE_INDEX
            positions = torch.arange(1, batch["input_ids"].shape[1], device=device)
            starts = torch.tensor([e["response_start"] for e in chunk], device=device)[:, None]
            in_response = (positions[None, :] >= starts) & (batch["attention_mask"][:, 1:] == 1)
            total += per_token[targets].sum().item()
            n_total += int(targets.sum())
            response += per_token[in_response].sum().item()
            n_response += int(in_response.sum())
    return HeldOutLoss(loss=total / n_total if n_total else math.nan,
                       response_loss=response / n_response if n_response else math.nan,
                       response_tokens=n_response)
