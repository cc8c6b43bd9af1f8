"""The project's SFT transform: labels, special tokens, no attention across examples, cuts, the chat template."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from oliveflow.sft import (
    IGNORE_INDEX, chat_format_template, encode_example, encode_rows, held_out_loss, pad_batch, split_template,
)

ROW = {"prompt": "Best month for Kyoto?", "response": "November, for the maples."}
PLAIN = "Q: {prompt}\nA: {response}"
PHI3 = "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_loss_is_on_the_response_only(tokenizer):
    example = encode_example(tokenizer, PLAIN, ROW, 128)
    ids, labels, start = example["input_ids"], example["labels"], example["response_start"]
    assert labels[:start] == [IGNORE_INDEX] * start
    assert labels[start:] == ids[start:]
    prompt_ids = tokenizer("Q: Best month for Kyoto?\nA: ", add_special_tokens=False)["input_ids"]
    assert ids[start - len(prompt_ids):start] == prompt_ids, "the prompt is exactly what generation starts from"
    assert tokenizer.decode(ids[start:]).startswith("November, for the maples.")
    everything = encode_example(tokenizer, PLAIN, ROW, 128, loss_on="all")
    assert everything["labels"] == everything["input_ids"]


@pytest.mark.parametrize("template", [PLAIN, PHI3])
def test_special_tokens_appear_once(tokenizer, template):
    example = encode_example(tokenizer, template, ROW, 128)
    ids, response = example["input_ids"], example["input_ids"][example["response_start"]:]
    if tokenizer.bos_token_id is not None:
        assert ids.count(tokenizer.bos_token_id) <= 1
    # The template may use the eos token as a turn marker in the prompt; the response ends with exactly one.
    assert response.count(tokenizer.eos_token_id) == 1 and response[-1] == tokenizer.eos_token_id


def test_bos_is_added_where_the_tokenizer_would_and_not_twice():
    class Fake:
        bos_token, bos_token_id, eos_token, eos_token_id = "<s>", 1, "</s>", 2

        def __call__(self, text, add_special_tokens=True):
            ids = [ord(c) + 10 for c in text.replace("<s>", "\x00").replace("</s>", "\x01")]
            ids = [1 if i == 10 else 2 if i == 11 else i for i in ids]
            return {"input_ids": ([1] if add_special_tokens else []) + ids}

    plain = encode_example(Fake(), PLAIN, ROW, 512)["input_ids"]
    assert plain[0] == 1 and plain.count(1) == 1 and plain[-1] == 2 and plain.count(2) == 1
    explicit = encode_example(Fake(), "<s>" + PLAIN + "</s>", ROW, 512)["input_ids"]
    assert explicit.count(1) == 1 and explicit.count(2) == 1


def test_no_attention_across_examples_and_positions_start_at_zero(tokenizer, model):
    short = encode_example(tokenizer, PLAIN, ROW, 128)
    long = encode_example(tokenizer, PLAIN, {"prompt": "What should I pack for a week of hiking in Patagonia?",
                                             "response": "Layers, a real rain shell and broken-in boots."}, 128)
    batch = pad_batch([short, long], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2, "one example per row, never packed"
    assert batch["attention_mask"][0].tolist() == [1] * len(short["input_ids"]) + \
        [0] * (len(long["input_ids"]) - len(short["input_ids"]))
    assert (batch["labels"][0, len(short["input_ids"]):] == IGNORE_INDEX).all()
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
        alone = model(input_ids=torch.tensor([short["input_ids"]])).logits[0]
    n = len(short["input_ids"])
    torch.testing.assert_close(together[:n], alone, atol=1e-4, rtol=1e-4)


def test_eval_loss_is_the_training_loss(tokenizer, model, tiny_model_dir):
    """held_out_loss over the transform's labels equals what the Trainer computes on the same padded batch."""
    rows = [ROW, {"prompt": "Is Lisbon hilly?", "response": "Very: wear good shoes."}]
    examples, _ = encode_rows(tokenizer, PLAIN, rows, 128)
    batch = pad_batch(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        trainer_loss = model(**batch).loss.item()
    measured = held_out_loss(model, examples, tokenizer.pad_token_id, batch_size=8)
    assert measured.loss == pytest.approx(trainer_loss, rel=1e-5)
    assert measured.response_loss == pytest.approx(trainer_loss, rel=1e-5), "loss_on=response: the same tokens"
    assert measured.response_perplexity == pytest.approx(math.exp(trainer_loss), rel=1e-5)
    everything, _ = encode_rows(tokenizer, PLAIN, rows, 128, loss_on="all")
    whole = held_out_loss(model, everything, tokenizer.pad_token_id)
    assert whole.response_loss == pytest.approx(measured.response_loss, rel=1e-5), "response loss is loss_on-proof"
    assert whole.loss != pytest.approx(measured.loss)


def test_olive_data_component_yields_the_same_examples(tokenizer, tiny_model_dir, tmp_path):
    """Olive's LoRA pass reads the data through this component: one example per row, as encoded here."""
    import json

    from olive.data.config import DataConfig
    from olive.passes.pytorch.train_utils import get_training_dataset

    from oliveflow.olive_runner import sft_data_config

    rows = [ROW, {"prompt": "Is Lisbon hilly?", "response": "Very: wear good shoes."}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DataConfig(**sft_data_config("train", path, tiny_model_dir, PLAIN, 128, "response", 2))
    dataset = get_training_dataset(config)
    expected, _ = encode_rows(tokenizer, PLAIN, rows, 128)
    assert len(dataset) == len(rows)
    for got, want in zip(dataset, expected):
        assert got["input_ids"].tolist() == want["input_ids"] and got["labels"].tolist() == want["labels"]


def test_long_examples_are_cut_and_counted(tokenizer):
    rows = [ROW, {"prompt": "x " * 200, "response": "y"}, {"prompt": "Hi", "response": "z " * 200}]
    examples, stats = encode_rows(tokenizer, PLAIN, rows, 32)
    assert stats.examples == 3 and stats.truncated == 2 and stats.dropped == 1
    assert len(examples) == 2 and all(len(e["input_ids"]) <= 32 for e in examples)
    assert "2 of 3 examples are longer than max_seq_len=32" in stats.warning(32)
    assert "raise finetune.max_seq_len" in stats.warning(32)


def test_the_models_chat_template_becomes_a_format_string(tokenizer):
    chat = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    chat.chat_template = "{# a {literal} brace #}System {x}\n" + CHATML
    template = chat_format_template(chat, "question", "answer")
    assert template == ("System {{x}}\n<|im_start|>user\n{question}<|im_end|>\n"
                        "<|im_start|>assistant\n{answer}<|im_end|>\n")
    head, tail = split_template(template)
    assert head == "System {{x}}\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    assert tail == "{answer}<|im_end|>\n"
    generation = chat.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False,
                                          add_generation_prompt=True)
    assert head.format(question="Q?") == generation, "the prompt is what the model's own template asks with"
    tokenizer_without = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer_without.chat_template = None
    assert chat_format_template(tokenizer_without, "prompt", "response") is None
