"""A generated corpus of bad input (hypothesis): dataset lines, data templates and flow parameters.

Each case either runs or fails with one line that names the input, the problem and the fix: an
``InputError`` from the data check, or ``oliveflow: error: ...`` with exit code 2 from the command.
Never only a traceback, never a hang. Accepted data is read back the way the fine-tune reads it
(Hugging Face datasets, then the SFT transform) and must render exactly the values written.

Part of the reliability issue. Hypothesis keeps no example database here (``database=None``): the
working tree stays clean. A developer's run draws afresh, to keep finding new cases; under CI (``$CI`` set)
the draw is fixed (``derandomize``), so the gate does not change from one run to the next.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import string
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from oliveflow import cli
from oliveflow.cli import _one_line
from oliveflow.config import DataConfig, PipelineParams, template_fields
from oliveflow.errors import InputError
from oliveflow.sft import encode_example, encode_rows, render, split_template
from oliveflow.stages.data import prompt_and_reference, read_examples, resolve_template, validate_data

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
FIELDS = ("prompt", "response")
TEMPLATE = "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"
BOM = b"\xef\xbb\xbf"
# Text that would do something if a value were ever read as a format string (or a %-template, or ${}).
INJECTIONS = ["{0.__class__}", "{prompt}", "}}{{", "{response!r}", "{prompt.__class__.__mro__}", "{", "}", "{}",
              "{0}", "{prompt:>10000000}", "%(prompt)s", "${prompt}", "{{prompt}}", "<|end|>", "\u2028", "\x85",
              "\x00", "\ufeff", "\\u0000"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def settings_for(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                    derandomize=bool(os.environ.get("CI")),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


def assert_one_line(message: str, fix: bool = True) -> None:
    """One line a person can act on: no line break of any kind, no traceback, a problem and (``fix``) what to do.

    pydantic's own messages ("Input should be greater than or equal to 1") say the fix in the problem.
    """
    assert message and len(message.splitlines()) == 1 and "\n" not in message, message
    assert "Traceback" not in message, message
    assert "; " in message or not fix, message


# ---- fixtures: a byte-level tokenizer, a model folder, small data files (all built in well under a second) ----

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-input")


@pytest.fixture(scope="module")
def tokenizer():
    """A real Hugging Face fast tokenizer (byte-level BPE, no merges): the SFT transform's code path, no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in ("<s>", "</s>", "<pad>"):
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizer_dirs(tokenizer, work) -> dict[str, Path]:
    """Folders resolve_template loads: one tokenizer without a chat template, one with ChatML."""
    plain, chat = work / "tokenizer-plain", work / "tokenizer-chat"
    tokenizer.save_pretrained(plain)
    tokenizer.chat_template = CHATML
    try:
        tokenizer.save_pretrained(chat)
    finally:
        tokenizer.chat_template = None
    return {"plain": plain, "chat": chat}


@pytest.fixture(scope="module")
def model_dir(tokenizer, work) -> Path:
    """What the pre-flight reads of a model (config.json, safetensors headers, tokenizer): hidden 128, MLP 256."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = work / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 259, "max_position_embeddings": 512}))
    save_file({"model.embed_tokens.weight": np.zeros((259, 128), dtype=np.float32)}, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(folder)
    return folder


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_files(work) -> dict[str, Path]:
    rows = [{"prompt": f"Where to stay in town {i}? {{0.__class__}}", "response": f"By the harbour {i}. }}{{",
             "context": f"Town {i}"} for i in range(3)]
    return {"train": write_rows(work / "train.jsonl", rows), "eval": write_rows(work / "eval.jsonl", rows[:2]),
            "eval_without_response": write_rows(work / "eval-bad.jsonl", [{"prompt": "only a prompt"}])}


# ---- dataset lines ----

texts = st.one_of(st.text(min_size=1, max_size=40),
                  st.lists(st.one_of(st.sampled_from(INJECTIONS), st.text(max_size=5)), min_size=1, max_size=6)
                  .map("".join).filter(bool))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
not_text = json_values.filter(lambda v: v is not None and not isinstance(v, str))


@st.composite
def good_rows(draw) -> dict:
    """A valid example: every template field a non-empty string, extra fields of any JSON type, any key order."""
    row = {field: draw(texts) for field in FIELDS}
    extras = draw(st.dictionaries(st.text(max_size=6).filter(lambda k: k not in FIELDS), json_values, max_size=3))
    return dict(draw(st.permutations([*row.items(), *extras.items()])))


def dumps(row: object, ascii_only: bool) -> str:
    return json.dumps(row, ensure_ascii=ascii_only)


@st.composite
def good_lines(draw) -> tuple[str, bytes, dict]:
    row = draw(good_rows())
    text = dumps(row, draw(st.booleans()))
    variant = draw(st.sampled_from(["plain", "spaced", "nested"]))
    if variant == "spaced":  # JSON whitespace around the object
        text = draw(st.sampled_from([" ", "\t", "  \t"])) + text + draw(st.sampled_from(["", " ", "\t"]))
    elif variant == "nested":  # as deep as the fine-tune's reader goes (63 levels with the line's own object)
        depth = draw(st.integers(1, 62))
        text = text[:-1] + (", " if len(row) else "") + '"deep_nesting_key": ' + "[" * depth + "]" * depth + "}"
    return "good", text.encode("utf-8"), row


@st.composite
def bad_lines(draw) -> tuple[str, bytes, str]:
    """A line validate_data must refuse, and a fragment its message must hold."""
    kind = draw(st.sampled_from(["missing", "empty", "wrong_type", "not_object", "truncated", "invalid_utf8",
                                 "duplicate_key", "lone_surrogate", "too_deep", "huge_number", "junk", "mid_bom"]))
    row = draw(good_rows())
    field = draw(st.sampled_from(FIELDS))
    ascii_only = draw(st.booleans())
    text = dumps(row, ascii_only)
    more = text[:-1] + ", "  # the row's object, open for one more member
    if kind == "missing":
        del row[field]
        return kind, dumps(row, ascii_only).encode(), "missing or empty"
    if kind == "empty":
        row[field] = draw(st.sampled_from(["", None]))
        return kind, dumps(row, ascii_only).encode(), "missing or empty"
    if kind == "wrong_type":
        row[field] = draw(not_text)
        return kind, dumps(row, ascii_only).encode(), "not a string"
    if kind == "not_object":
        value = draw(st.one_of(json_values.filter(lambda v: not isinstance(v, dict)),
                               st.lists(good_rows(), max_size=2)))
        return kind, dumps(value, ascii_only).encode(), "expected a JSON object"
    if kind == "truncated":
        return kind, text[:draw(st.integers(1, len(text) - 1))].encode(), "not valid JSON"
    if kind == "invalid_utf8":
        junk = draw(st.sampled_from([b"\xff", b"\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"\xe2\x82",
                                     b"\xf0\x9f\x98", b"\xf8\x88\x80\x80\x80"]))
        data = text.encode()
        return kind, (data[:1] + junk + data[1:]) if draw(st.booleans()) else data + junk, "not valid UTF-8"
    if kind == "duplicate_key":
        if draw(st.booleans()):
            key = draw(st.sampled_from(sorted(row)))
            return kind, (more + json.dumps(key) + ": " + json.dumps(draw(json_values)) + "}").encode(), "appears twice"
        return kind, (more + '"nested_duplicate": {"k": 1, "k": [2]}}').encode(), "appears twice"
    if kind == "lone_surrogate":
        escape = draw(st.sampled_from(["\\ud800", "\\udfff", "\\udc00\\ud800", "x\\udbff"]))
        member = draw(st.sampled_from([f'"surrogate_value": "a{escape}b"', f'"{escape}": 1']))
        return kind, (more + member + "}").encode(), "surrogate"
    if kind == "too_deep":
        depth = draw(st.sampled_from([63, 64, 100, 5000, 200_000]))
        return kind, (more + '"deep_nesting_key": ' + "[" * depth + "]" * depth + "}").encode(), "nested"
    if kind == "huge_number":
        number, fragment = draw(st.sampled_from([("1e400", "does not fit a double"), ("-2.5e999", "does not fit"),
                                                 ("9" * 5000, "cannot be read")]))
        return kind, (more + '"huge_number": ' + number + "}").encode(), fragment
    if kind == "junk":  # whitespace to str.strip(), not to JSON
        return kind, draw(st.sampled_from(["\xa0", "\x0b", "\x0c", "\x1c", "\u2028", "\u3000", "\x85"])).encode(), \
            "not valid JSON"
    return kind, BOM + text.encode(), "not valid JSON"  # mid_bom: a second file glued on


blank_lines = st.sampled_from([b"", b" ", b"\t", b"  \t  "]).map(lambda b: ("blank", b, None))


@st.composite
def jsonl_files(draw, bad: bool = True) -> tuple[bytes, dict]:
    """File bytes, and what reading them must give: the first bad line (number, fragment) or the good rows."""
    kinds = [good_lines(), good_lines(), blank_lines] + ([bad_lines()] if bad else [])  # good twice as likely
    items = draw(st.lists(st.one_of(*kinds), max_size=8))
    bom = draw(st.booleans())
    ending = draw(st.sampled_from([b"\n", b"\r\n", b"\r", "mixed"]))
    chunks, rows, first_bad = [BOM] if bom else [], [], None
    for number, (kind, data, extra) in enumerate(items, start=1):
        if kind == "mid_bom" and number == 1 and not bom:  # a BOM at the very start is fine
            kind, extra = "good", json.loads(data[len(BOM):])
        if kind == "good" and first_bad is None:
            rows.append(extra)
        elif kind not in ("good", "blank") and first_bad is None:
            first_bad = (number, extra)
        end = draw(st.sampled_from([b"\n", b"\r\n"])) if ending == "mixed" else ending
        chunks.append(data + (end if number < len(items) or draw(st.booleans()) else b""))
    return b"".join(chunks), {"bad": first_bad, "rows": rows}


def expected_render(template: str, row: dict) -> str:
    """The template with each placeholder replaced by the field's text, literally (no str.format)."""
    return "".join(literal + (row[name] if name is not None else "")
                   for literal, name, _, _ in string.Formatter().parse(template))


def check_renders(template: str, rows: list[dict], tokenizer, encode: bool = True) -> None:
    """Every row renders with the template exactly, by the fine-tune's path (split, render, encode)."""
    head, tail = split_template(template)
    fields = template_fields(template)
    for row in rows:
        text = render(template, row)
        assert text == expected_render(template, row)
        assert render(head, row) + render(tail, row) == text
        prompt, reference = prompt_and_reference(template, row)
        assert prompt == render(head, row) and reference == row[fields[-1]]
        if encode:
            example = encode_example(tokenizer, template, row, max_seq_len=64)
            assert example is None or len(example["input_ids"]) <= 64


READER_REFUSED = "the fine-tune's reader (Hugging Face datasets) cannot read it"


def load_like_the_finetune(path: Path) -> list[dict]:
    """The training file as Olive's data config loads it (HuggingfaceContainer: datasets' json builder)."""
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as cache:
        return [dict(row) for row in datasets.load_dataset("json", data_files=[str(path)], split="train",
                                                          cache_dir=cache)]


def assert_reader_fails(path: Path) -> None:
    """validate_data refused a file whose lines are all fine to Python: the fine-tune's reader must fail on it too."""
    with pytest.raises(Exception):
        load_like_the_finetune(path)


def check_validation(path: Path, expected: dict, tokenizer, role: str, good_train: Path) -> None:
    config = DataConfig(train_path=path, eval_path=None, template=TEMPLATE) if role == "train" else \
        DataConfig(train_path=good_train, eval_path=path, template=TEMPLATE)
    try:
        report = validate_data(config)
    except InputError as exc:
        message = str(exc)
        assert_one_line(message)
        event("refused: " + ("a bad line" if expected["bad"] else "unreadable to the fine-tune's reader"
                             if READER_REFUSED in message else "no examples"))
        if expected["bad"] is not None:
            number, fragments = expected["bad"]
            fragments = (fragments,) if isinstance(fragments, str) else fragments
            assert f"{path}:{number}: " in message and any(f in message for f in fragments), (expected, message)
        elif READER_REFUSED in message:
            assert role == "train" and f"data file {path}: " in message, message
            assert_reader_fails(path)
        else:
            assert not expected["rows"] and f"data file {path} has no examples" in message, message
        return
    assert expected["bad"] is None and expected["rows"], f"accepted, but expected {expected['bad']}"
    event("accepted")
    rows = read_examples(path, list(FIELDS))
    assert (report.rows if role == "train" else report.eval_rows) == len(rows) == len(expected["rows"])
    assert [{f: r[f] for f in FIELDS} for r in rows] == [{f: r[f] for f in FIELDS} for r in expected["rows"]]
    check_renders(TEMPLATE, rows, tokenizer)


GOOD_ROW = {"prompt": "a {0.__class__}", "response": "b }}{{"}
GOOD_LINE = json.dumps(GOOD_ROW).encode()


@settings_for(300)
@given(file=jsonl_files(), role=st.sampled_from(["train", "eval"]))
@example(file=(BOM + GOOD_LINE + b"\r\n\r\n" + GOOD_LINE, {"bad": None, "rows": [GOOD_ROW, GOOD_ROW]}), role="train")
@example(file=(GOOD_LINE + b"\n" + GOOD_LINE[:5] + b"\xff" + GOOD_LINE[5:],
               {"bad": (2, "not valid UTF-8"), "rows": []}), role="eval")
@example(file=(GOOD_LINE[:-1] + b', "x": [true]}\n\n' + GOOD_LINE[:-1] + b', "x": [1]}\n', {"bad": None, "rows": [
    GOOD_ROW | {"x": [True]}, GOOD_ROW | {"x": [1]}]}), role="train")  # Arrow: mixed type below a blank line
def test_dataset_lines_run_or_fail_with_one_line_naming_file_and_line(file, role, work, tokenizer, data_files):
    content, expected = file
    with tempfile.TemporaryDirectory(dir=work) as folder:
        path = Path(folder) / f"{role}.jsonl"
        path.write_bytes(content)
        check_validation(path, expected, tokenizer, role, data_files["train"])


@settings_for(6)
@given(size=st.integers(1_000_000, 5_000_000), piece=texts, huge_field=st.sampled_from(FIELDS),
       then_bad=st.booleans(), ending=st.sampled_from(["\n", "\r\n"]))
def test_huge_lines(size, piece, huge_field, then_bad, ending, work, tokenizer):
    huge = (piece * (size // len(piece) + 1))[:size]
    row = {"prompt": "Where?", "response": "Here."} | {huge_field: huge}
    line = json.dumps(row, ensure_ascii=False)
    content = line + ending + (line[:-3] + ending if then_bad else "")  # a huge line cut short
    with tempfile.TemporaryDirectory(dir=work) as folder:
        path = Path(folder) / "train.jsonl"
        path.write_text(content, encoding="utf-8", newline="")
        try:
            validate_data(DataConfig(train_path=path, eval_path=None, template=TEMPLATE))
        except InputError as exc:
            assert_one_line(str(exc))
            assert then_bad and f"{path}:2: not valid JSON" in str(exc) and len(str(exc)) < 1000
        else:
            assert not then_bad
            rows = read_examples(path, list(FIELDS))
            assert rows == [row]
            check_renders(TEMPLATE, rows, tokenizer, encode=False)  # tokenizing 5 MB is the tokenizer's business


@settings_for(80)
@given(file=jsonl_files(bad=False))
def test_accepted_files_read_the_same_through_the_finetunes_loader(file, work, tokenizer):
    """What validate_data accepts, Hugging Face datasets (the fine-tune's reader) reads to the same examples;
    what it refuses although every line is fine to Python, that reader cannot read."""
    content, expected = file
    with tempfile.TemporaryDirectory(dir=work) as folder:
        path = Path(folder) / "train.jsonl"
        path.write_bytes(content)
        try:
            validate_data(DataConfig(train_path=path, eval_path=None, template=TEMPLATE))
        except InputError as exc:
            assert_one_line(str(exc))
            refused_by_reader = READER_REFUSED in str(exc)
            event("refused: " + ("unreadable to the fine-tune's reader" if refused_by_reader else "no examples"))
            if refused_by_reader:
                assert_reader_fails(path)
            else:
                assert not expected["rows"] and "has no examples" in str(exc), str(exc)
            return
        event("accepted")
        ours = read_examples(path, list(FIELDS))
        theirs = load_like_the_finetune(path)
        assert [{f: r[f] for f in FIELDS} for r in theirs] == [{f: r[f] for f in FIELDS} for r in ours]
        # The training transform (olive_ext.sft_pre_process) and the held-out one give the same examples.
        assert encode_rows(tokenizer, TEMPLATE, theirs, 64)[0] == encode_rows(tokenizer, TEMPLATE, ours, 64)[0]


# ---- templates ----

GOOD_PLACEHOLDERS = ["{prompt}", "{response}", "{context}", "{prompt:}"]
INJECTION_PLACEHOLDERS = ["{0.__class__}", "{prompt.__class__.__mro__}", "{prompt!r}", "{prompt!s}", "{prompt!a}",
                          "{prompt:>10000000}", "{prompt:{response}}", "{}", "{0}", "{1}", "{prompt[0]}",
                          "{prompt.upper}", "{:>999999999}", "{!r}", "{response:,}", "{prompt!r:^99}"]
BROKEN = ["{", "}", "{prompt", "prompt}", "{prompt}}", "{!}", "{prompt!x}", "{a[}"]
UNKNOWN = ["{unknown}", "{ prompt }", "{Prompt}", "{réponse}"]
LITERALS = ["", " ", "\n", "<|end|>", "{{", "}}", "{{prompt}}", "Q: ", "\nA: ", "%s", "${x}"]
templates = st.one_of(
    st.lists(st.one_of(st.sampled_from(GOOD_PLACEHOLDERS + INJECTION_PLACEHOLDERS + BROKEN + UNKNOWN + LITERALS),
                       st.text(max_size=6)), max_size=7).map("".join),
    st.lists(st.one_of(st.sampled_from(GOOD_PLACEHOLDERS + LITERALS), st.text(max_size=6).map(
        lambda text: text.replace("{", "{{").replace("}", "}}"))), max_size=7).map("".join),  # mostly accepted
    st.text(max_size=30))


def template_verdict(template: str) -> str:
    """What a template must come to, decided here independently of the product code."""
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError:
        return "broken"
    placeholders = [(name, spec, conv) for _, name, spec, conv in pieces if name is not None]
    if any(name == "" or name.isdecimal() or "." in name or "[" in name or conv is not None or spec
           or not name.isprintable() for name, spec, conv in placeholders):
        return "injection"
    if not placeholders:
        return "no placeholders"
    return "unknown" if {name for name, _, _ in placeholders} - {"prompt", "response", "context"} else "ok"


@settings_for(300)
@given(template=templates)
@example(template="{prompt}: {response} {{response}}")  # an escaped "{{response" after the last placeholder
@example(template="{prompt:>10000000}{response}")
def test_templates_are_plain_placeholders_or_refused_up_front(template, tokenizer, data_files):
    verdict = template_verdict(template)
    event(f"template: {verdict}")
    try:
        config = DataConfig(train_path=data_files["train"], eval_path=None, template=template)
    except ValidationError as exc:
        message = _one_line(exc)
        assert_one_line(message)
        assert message.startswith("invalid parameter template: template ")
        assert verdict in ("broken", "injection", "no placeholders"), (verdict, message)
        if verdict != "no placeholders":
            assert "use plain {field} placeholders" in message, message
        return
    assert verdict in ("unknown", "ok"), f"{template!r} ({verdict}) was accepted"
    try:
        validate_data(config)
    except InputError as exc:
        assert_one_line(str(exc))
        assert verdict == "unknown" and f"{data_files['train']}:1: field " in str(exc), str(exc)
        return
    assert verdict == "ok"
    rows = read_examples(data_files["train"], config.fields())
    check_renders(template, rows, tokenizer)
    for row in rows:  # bounded: the template's text plus the values it names, nothing grown from a spec
        rendered = render(template, row)
        assert len(rendered) <= len(template) + template.count("{") * max(len(v) for v in row.values())
        assert "<class" not in rendered or "<class" in template


FIELD_NAMES = ["prompt", "response", "question", "user question", "q-1", "réponse", "a.b", "a[0]", "0", "", "x}",
               "{x", "x!r", "x:>9", "line\nbreak", " "]


def field_name_ok(name: str) -> bool:
    """Whether "{name}" is exactly one plain placeholder for that name."""
    try:
        pieces = list(string.Formatter().parse("{" + name + "}"))
    except ValueError:
        return False
    return pieces == [("", name, "", None)] and template_verdict("{" + name + "}") in ("ok", "unknown")


field_names = st.one_of(st.sampled_from(FIELD_NAMES), st.from_regex(r"[^\W\d][\w \-]{0,10}", fullmatch=True),
                        st.text(max_size=8))


@settings_for(200)
@given(prompt_field=field_names, response_field=field_names,
       chat=st.sampled_from(["plain", "chat"]))
@example(prompt_field="response", response_field="prompt", chat="plain")  # the Phi-3 default, fields swapped
def test_prompt_and_response_fields_make_a_working_template(prompt_field, response_field, chat, tokenizer_dirs):
    """With no template, the model's chat template (or the Phi-3 default) is filled with the two field names."""
    usable = all(field_name_ok(name) for name in (prompt_field, response_field)) and prompt_field != response_field
    event("usable field names" if usable else "refused field names")
    try:
        config = DataConfig(template=None, prompt_field=prompt_field, response_field=response_field)
    except ValidationError as exc:
        assert_one_line(_one_line(exc))
        assert not usable, _one_line(exc)
        return
    assert usable, (prompt_field, response_field)
    template = resolve_template(config, tokenizer_dirs[chat])
    assert template_fields(template) == [prompt_field, response_field]
    row = {prompt_field: "P {0.__class__} }}{{", response_field: "R {prompt!r}"}
    head, tail = split_template(template)
    assert render(head, row).endswith(row[prompt_field] + ("<|end|>\n<|assistant|>\n" if chat == "plain" else
                                                           "<|im_end|>\n<|im_start|>assistant\n"))
    assert render(tail, row).startswith(row[response_field])


# ---- flow parameters ----

SCHEMA = PipelineParams.model_json_schema()


def from_schema(schema: dict, overrides: dict, path: tuple[str, ...] = ()) -> st.SearchStrategy:
    """Values the run form accepts, read from the parameters' JSON schema (so a new field is covered too)."""
    if path in overrides:
        return overrides[path]
    if "$ref" in schema:
        return from_schema(SCHEMA["$defs"][schema["$ref"].rsplit("/", 1)[-1]], overrides, path)
    if "anyOf" in schema:
        return st.one_of(*(from_schema(option, overrides, path) for option in schema["anyOf"]))
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        return st.fixed_dictionaries({}, optional={name: from_schema(sub, overrides, (*path, name))
                                                   for name, sub in schema.get("properties", {}).items()})
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), overrides, path), max_size=3)
    if kind == "string":
        return st.from_regex(schema["pattern"], fullmatch=True) if "pattern" in schema else st.text(max_size=20)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -(2**40) - 1) + 1)
        return st.one_of(st.integers(low, schema.get("maximum")), st.sampled_from([low, -1, 0, 1, 16, 32, 64, 256]))
    if kind == "number":
        return st.floats(min_value=schema.get("minimum", schema.get("exclusiveMinimum")),
                         max_value=schema.get("maximum", schema.get("exclusiveMaximum")),
                         exclude_min="exclusiveMinimum" in schema, exclude_max="exclusiveMaximum" in schema,
                         allow_nan=False, allow_infinity=False)
    raise AssertionError(f"no strategy for {path}: {schema}")


class Ready(Exception):
    """Raised in place of starting Prefect: the parameters passed every pre-flight check."""


def run_cli(argv: list[str]) -> tuple[str, int | None, str]:
    """``oliveflow run`` in-process up to where the pipeline would start: ("ready"|"failed", exit code, stderr)."""
    real = cli._preflight

    def preflight_then_stop(params):
        real(params)
        raise Ready

    stderr = io.StringIO()
    with mock.patch.object(cli, "_preflight", preflight_then_stop), contextlib.redirect_stderr(stderr):
        try:
            code = cli.main(["run", *argv])
        except Ready:
            return "ready", None, stderr.getvalue()
        except SystemExit as exc:  # argparse
            code = exc.code
    return "failed", code, stderr.getvalue()


def assert_cli_error(code: int | None, stderr: str) -> str:
    assert code == 2, stderr
    line = stderr.rstrip("\n")
    assert_one_line(line, fix=not line.startswith("oliveflow: error: invalid parameter"))
    assert line.startswith("oliveflow: error: ") and stderr.endswith("\n"), stderr
    return line


def as_argv(raw: dict, style: st.DataObject) -> list[str]:
    """``--param key=value`` for every leaf; text written bare when the command would read it back as text."""
    argv = []

    def leaves(tree: dict, prefix: str):
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, f"{prefix}{key}.")
            elif not isinstance(value, dict):
                yield prefix + key, value

    for key, value in leaves(raw, ""):
        text = json.dumps(value)
        if isinstance(value, str) and style.draw(st.booleans(), label=f"bare {key}"):
            try:
                reread = json.loads(value)
            except ValueError:
                reread = 0
            if not isinstance(reread, str) and reread is not None:  # what the command keeps as written
                text = value
        if key == "finetune.max_steps" and style.draw(st.booleans(), label="flag"):
            argv += ["--max-steps", str(value)]
            continue
        argv.append(f"--param={key}={text}")
    return argv


@pytest.fixture(scope="module")
def form_values(model_dir, data_files, work):
    folder = work / "params"
    (folder / "not-ours").mkdir(parents=True)
    (folder / "not-ours" / "keep.txt").write_text("someone's file")
    free = st.text(max_size=20)
    overrides = {
        ("model",): st.one_of(st.just(str(model_dir)), st.just(str(model_dir)), free),
        ("data", "train_path"): st.one_of(st.just(str(data_files["train"])), st.just(str(folder / "no.jsonl")), free),
        ("data", "eval_path"): st.one_of(st.just(str(data_files["eval"])), st.none(),
                                         st.just(str(data_files["eval_without_response"])), free),
        ("data", "template"): st.one_of(st.none(), st.sampled_from(["{prompt} => {response}", "Q ({context}): "
                                        "{prompt}\nA: {response}", "{question} {answer}"] + INJECTION_PLACEHOLDERS),
                                        templates),
        ("data", "prompt_field"): st.sampled_from(FIELD_NAMES) | free,
        ("data", "response_field"): st.sampled_from(FIELD_NAMES) | free,
        ("output_dir",): st.one_of(st.none(), st.just(str(folder / "out")), st.just(str(folder / "not-ours")), free),
        ("artifact_store",): st.one_of(st.none(), st.just(str(folder / "store")),
                                       st.sampled_from(["memory://store", "nope://x", "s3://bucket/x"]), free),
        ("quantize", "group_size"): st.sampled_from([-1, 16, 32, 64, 128, 256, 512, 48, 0, -16, 2**40]),
    }
    return from_schema(SCHEMA, overrides)


@contextlib.contextmanager
def no_azure_workspace(folder: Path):
    """No Azure workspace from the environment or a config.json above the working folder, which is ``folder``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "AZUREML_"))}
    with mock.patch.dict(os.environ, clean, clear=True), contextlib.chdir(folder):
        yield folder


@pytest.fixture()
def offline_registry_env(tmp_path):
    with no_azure_workspace(tmp_path):
        yield tmp_path


@settings_for(250)
@given(raw=st.data(), style=st.data())
def test_flow_parameters_pass_preflight_or_fail_with_one_line(raw, style, form_values, model_dir, work):
    """Every value the run form accepts (read from the JSON schema), and the combinations it cannot rule out:
    the command either reaches the point where the pipeline starts, or says why in one line."""
    raw = raw.draw(form_values, label="parameters")
    raw.setdefault("model", str(model_dir))  # the default, embedded:tiny-phi3, would be built (seconds)
    argv = as_argv(raw, style)
    try:
        PipelineParams.model_validate(raw)
        valid = True
    except ValidationError as exc:
        assert_one_line(_one_line(exc), fix=False)
        valid = False
    with no_azure_workspace(work / "params"):  # relative paths land in the test's own folder
        outcome, code, stderr = run_cli(argv)
    if outcome == "ready":
        event("ready to start the pipeline")
        assert valid, (raw, argv, stderr)
        return
    line = assert_cli_error(code, stderr)
    if not valid:  # the form's refusal, through the command's path
        assert line.startswith("oliveflow: error: invalid parameter"), (raw, line)
    event("refused: invalid parameters" if line.startswith("oliveflow: error: invalid parameter")
          else "refused by the pre-flight checks")


IMPOSSIBLE = [
    # (--param values, what the one line must say)
    (["quantize.group_size=256"], "hidden_size=128 is not divisible by quantize.group_size=256"),
    (["quantize.group_size=48"], "group_size must be -1 or a power of two"),
    (["finetune.max_steps=0"], "invalid parameter finetune.max_steps: Input should be greater than or equal to 1"),
    (["finetune.max_steps=-5"], "finetune.max_steps"),
    (["finetune.seed=-1"], "finetune.seed"),
    (["finetune.seed=4294967296"], "finetune.seed"),
    (["finetune.learning_rate=Infinity"], "finetune.learning_rate: Input should be a finite number"),
    (["finetune.alpha=NaN"], "finetune.alpha"),
    (["finetune.dropout=1"], "finetune.dropout"),
    (["finetune.max_seq_len=8"], "finetune.max_seq_len"),
    (["export.device=gpu", "quantize.bits=8"], "export.device gpu needs quantize.bits 4"),
    (["tracking.enabled=false"], "registry.backend mlflow registers the model the tracking run logs"),
    (["tracking.log_model=false"], "keep tracking.enabled and tracking.log_model on"),
    (["registry.backend=azureml", "tracking.enabled=false"], "registry azureml: missing registry.azure"),
    (["data.template={question} {answer}"], ":1: field 'question' used by the template is missing"),
    (["data.template={0.__class__} {response}"], "placeholder '{0.__class__}' accesses an attribute or index"),
    (["data.template={prompt!r} {response}"], "has a conversion (!r)"),
    (["data.template={prompt:>10000000} {response}"], "has a format spec"),
    (["data.template={} {response}"], "is positional"),
    (["data.prompt_field=answer", "data.response_field=answer"], "prompt_field and response_field are both 'answer'"),
    (["data.prompt_field=a.b"], "prompt_field 'a.b' cannot name a template placeholder"),
    (["data.eval_path=EVAL_WITHOUT_RESPONSE"], "eval-bad.jsonl:1: field 'response'"),
    (["output_dir=NOT_OURS"], "was not written by oliveflow"),
    (["finetune=3", "finetune.r=4"], "finetune was already given a whole value"),
    (["finetune.rank=8"], "unknown parameter finetune.rank; valid names under finetune: alpha, batch_size,"),
    (["finetune.lerning_rate=1e-3"], "unknown parameter finetune.lerning_rate; did you mean finetune.learning_rate?"),
    (["registry.model_name=bad name!"], "registry.model_name"),
    (["fine\ntune.r=8"], "fine\\ntune"),
    (["data.train_path=/no/such\u2028file.jsonl"], "no/such\\u2028file.jsonl"),
]


@pytest.mark.parametrize("params, message", IMPOSSIBLE, ids=[" ".join(p) for p, _ in IMPOSSIBLE])
def test_impossible_combinations_fail_before_any_work(params, message, model_dir, data_files, work,
                                                      offline_registry_env):
    (work / "not-ours-2").mkdir(exist_ok=True)
    (work / "not-ours-2" / "keep.txt").write_text("someone's file")
    names = {"EVAL_WITHOUT_RESPONSE": str(data_files["eval_without_response"]), "NOT_OURS": str(work / "not-ours-2")}
    argv = ["--model", str(model_dir), "--data", str(data_files["train"]), "--eval-data", str(data_files["eval"])]
    for item in params:
        key, value = item.split("=", 1)
        argv.append(f"--param={key}={names.get(value, value)}")
    outcome, code, stderr = run_cli(argv)
    assert outcome == "failed"
    assert message in assert_cli_error(code, stderr), stderr


def test_a_good_run_passes_preflight_and_gpu_export_needs_cuda(model_dir, data_files, offline_registry_env):
    """The counterpart: the same checks let good parameters through, and refuse a GPU export without CUDA."""
    import onnxruntime_genai as og

    base = ["--model", str(model_dir), "--data", str(data_files["train"]), "--eval-data", str(data_files["eval"]),
            "--param=registry.version=2", "--param=quantize.group_size=128", "--template", "Q: {prompt}\nA: {response}"]
    assert run_cli(base)[0] == "ready"  # `registry.version=2` is the text "2", as the form would send it
    outcome, code, stderr = run_cli([*base, "--device", "gpu"])
    if og.is_cuda_available():
        assert outcome == "ready"
    else:
        assert "export.device gpu: the installed onnxruntime-genai has no CUDA" in assert_cli_error(code, stderr)


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", "many"], "argument --max-steps: invalid int value: 'many'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--param", "finetune.r"], "--param 'finetune.r' is not key=value"),
])
def test_command_line_mistakes_are_one_line_too(argv, message):
    outcome, code, stderr = run_cli(argv)
    assert outcome == "failed" and message in assert_cli_error(code, stderr), stderr


@pytest.mark.parametrize("argv, message", [
    (["--param", "finetune.max_steps=0"], "invalid parameter finetune.max_steps"),
    (["--param", "quantize.group_size=48"], "invalid parameter quantize.group_size"),
    (["--param", "export.device=gpu", "--param", "quantize.bits=8"], "export.device gpu needs quantize.bits 4"),
    (["--param", "tracking.enabled=false"], "registry.backend mlflow registers"),
    (["--template", "{prompt.__class__.__mro__} {response}"], "accesses an attribute or index"),
    (["--param", "data.template={prompt:>10000000}{response}"], "has a format spec"),
    (["--max-steps", "x"], "argument --max-steps: invalid int value"),
])
def test_the_real_command_fails_fast_with_one_line(argv, message):
    """`python -m oliveflow.cli run` itself: exit 2, one line on stderr, no traceback, before Prefect or Olive."""
    done = subprocess.run([sys.executable, "-m", "oliveflow.cli", "run", *argv], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 2 and not done.stdout, done
    assert message in assert_cli_error(done.returncode, done.stderr)


def test_refusals_do_not_import_prefect_or_olive():
    code = ("import sys; from oliveflow.cli import main; c = main(['run', '--param', 'finetune.max_steps=0']); "
            "heavy = [m for m in ('prefect', 'olive', 'torch', 'onnxruntime_genai') if m in sys.modules]; "
            "print(heavy); sys.exit(c)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2 and done.stdout.strip() == "[]", done
