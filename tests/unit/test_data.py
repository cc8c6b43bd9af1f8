import json

import pytest
from pydantic import ValidationError

from oliveflow.config import DataConfig
from oliveflow.errors import InputError
from oliveflow.config import DEFAULT_TEMPLATE
from oliveflow.stages.data import prompt_and_reference, resolve_template, validate_data

TEMPLATE = "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def rows(n):
    return [json.dumps({"prompt": f"Where should I stay in town {i}?", "response": f"Stay near the old harbour {i}."})
            for i in range(n)]


def test_valid_data_reports_stats(tmp_path):
    train = write(tmp_path / "t.jsonl", rows(3))
    report = validate_data(DataConfig(train_path=train, eval_path=None, template=TEMPLATE))
    assert report.rows == 3 and report.eval_rows == 0
    assert report.fields == ["prompt", "response"]
    assert report.chars_min <= report.chars_median <= report.chars_max
    assert len(report.train_sha256) == 64


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(InputError, match=r"data file .*nope.jsonl does not exist"):
        validate_data(DataConfig(train_path=tmp_path / "nope.jsonl", eval_path=None))


def test_malformed_line_names_the_line(tmp_path):
    train = write(tmp_path / "t.jsonl", rows(2) + ['{"prompt": "x", "response": '])
    with pytest.raises(InputError, match=r"t.jsonl:3: not valid JSON"):
        validate_data(DataConfig(train_path=train, eval_path=None))


def test_missing_field_names_field_and_line(tmp_path):
    train = write(tmp_path / "t.jsonl", rows(1) + [json.dumps({"prompt": "only a prompt"})])
    with pytest.raises(InputError, match=r"t.jsonl:2: field 'response'"):
        validate_data(DataConfig(train_path=train, eval_path=None))


def test_non_object_line(tmp_path):
    train = write(tmp_path / "t.jsonl", ["[1, 2]"])
    with pytest.raises(InputError, match=r"t.jsonl:1: expected a JSON object"):
        validate_data(DataConfig(train_path=train, eval_path=None))


def test_empty_dataset(tmp_path):
    train = write(tmp_path / "t.jsonl", ["", "  "])
    with pytest.raises(InputError, match="has no examples"):
        validate_data(DataConfig(train_path=train, eval_path=None))


def test_bad_eval_file_is_checked_too(tmp_path):
    train = write(tmp_path / "t.jsonl", rows(2))
    evals = write(tmp_path / "e.jsonl", ["not json"])
    with pytest.raises(InputError, match=r"e.jsonl:1"):
        validate_data(DataConfig(train_path=train, eval_path=evals))


def test_template_without_placeholders_is_refused():
    with pytest.raises(ValidationError, match="no {field} placeholders"):
        DataConfig(template="just text")


def test_other_schema_through_the_template(tmp_path):
    train = write(tmp_path / "t.jsonl", [json.dumps({"question": "Best month for Oslo?", "answer": "June.",
                                                      "city": "Oslo"})])
    config = DataConfig(train_path=train, eval_path=None, template="Q ({city}): {question}\nA: {answer}")
    assert validate_data(config).fields == ["city", "question", "answer"]
    prompt, reference = prompt_and_reference(config.template, {"city": "Oslo", "question": "Best month?",
                                                               "answer": "June."})
    assert prompt == "Q (Oslo): Best month?\nA: " and reference == "June."


def test_bundled_dataset_is_valid():
    report = validate_data(DataConfig())
    assert report.rows >= 300 and report.eval_rows >= 40


def test_data_location_can_be_a_url_read_afresh_each_time(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    url = f"memory://{tmp_path.name}/week/train.jsonl"
    fs.pipe_file(url, "".join(line + "\n" for line in rows(20)).encode())
    first = validate_data(DataConfig(train_path=url, eval_path=None))
    assert first.rows == 20 and first.train_path.is_file() and first.train_path.name == "train.jsonl"
    fs.pipe_file(url, "".join(line + "\n" for line in rows(19)).encode())  # next week's data
    second = validate_data(DataConfig(train_path=url, eval_path=None))
    assert second.rows == 19 and second.train_sha256 != first.train_sha256
    assert not list(second.train_path.parent.glob(".get-*")), "a temp download was left behind"


def test_data_url_errors_name_the_url(tmp_path):
    import fsspec

    url = f"memory://{tmp_path.name}/bad.jsonl"
    with pytest.raises(InputError, match=r"data file memory://.*/missing.jsonl does not exist"):
        validate_data(DataConfig(train_path=url.replace("bad", "missing"), eval_path=None))
    with pytest.raises(InputError, match=r"data file nope://x/train.jsonl: Protocol not known: nope"):
        validate_data(DataConfig(train_path="nope://x/train.jsonl", eval_path=None))
    fsspec.filesystem("memory").pipe_file(url, b'{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(InputError, match=rf"{url}:2: not valid JSON"):
        validate_data(DataConfig(train_path=url, eval_path=None))


def test_a_file_the_finetune_reader_took_is_not_read_again(monkeypatch, tmp_path):
    monkeypatch.setenv("OLIVEFLOW_HOME", str(tmp_path / "home"))
    train = write(tmp_path / "t.jsonl", rows(3))
    validate_data(DataConfig(train_path=train, eval_path=None))
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("read again"))
    validate_data(DataConfig(train_path=train, eval_path=None))  # same content: remembered
    write(train, rows(4))
    with pytest.raises(pytest.fail.Exception, match="read again"):
        validate_data(DataConfig(train_path=train, eval_path=None))


@pytest.mark.parametrize("where", ["none", "jinja", "additional", "config", "config-null"])
def test_the_tokenizer_is_loaded_only_when_the_model_has_a_chat_template(where, monkeypatch, tmp_path):
    config = {"bos_token": "<s>"}
    if where == "jinja":
        (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    elif where == "additional":
        (tmp_path / "additional_chat_templates").mkdir()
        (tmp_path / "additional_chat_templates" / "tools.jinja").write_text("{{ messages }}")
    elif where.startswith("config"):
        config["chat_template"] = None if where == "config-null" else "{{ messages }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    data = DataConfig(train_path=tmp_path / "t.jsonl")
    if where in ("none", "config-null"):
        assert resolve_template(data, tmp_path) == DEFAULT_TEMPLATE.format(prompt="{prompt}", response="{response}")
    else:
        with pytest.raises(pytest.fail.Exception, match="loaded"):
            resolve_template(data, tmp_path)
