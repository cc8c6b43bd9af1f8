"""validate_data: every line parsed and checked against the fields the template uses."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

from oliveflow.config import DEFAULT_TEMPLATE, DataConfig, template_fields
from oliveflow.errors import InputError
from oliveflow.hashing import file_sha256
from oliveflow.results import DataReport
from oliveflow.sft import chat_format_template, render, split_template
from oliveflow.store import host_copies, is_url, url_filesystem


def read_examples(path: Path, fields: list[str], shown: str | Path | None = None) -> list[dict]:
    """Parse a JSONL file; raise InputError naming the file (as ``shown``, e.g. its URL), line and fix on the first
    bad line."""
    path = Path(path)
    name = shown or path
    if not path.is_file():
        raise InputError(f"data file {name} does not exist; pass an existing JSONL file (--data / data.train_path)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{name}:{number}: not valid JSON ({exc.msg}); "
                                 "write one JSON object per line") from None
            if not isinstance(row, dict):
                raise InputError(f"{name}:{number}: expected a JSON object, got {type(row).__name__}; "
                                 "write one JSON object per line")
            missing = [field for field in fields if row.get(field) in (None, "")]
            if missing:
                raise InputError(f"{name}:{number}: field {missing[0]!r} used by the template is missing or empty; "
                                 f"add it to every line or change the template (fields used: {', '.join(fields)})")
            rows.append(row)
    if not rows:
        raise InputError(f"data file {name} has no examples; add JSONL lines with fields {', '.join(fields)}")
    return rows


def prompt_and_reference(template: str, row: dict) -> tuple[str, str]:
    """Split a rendered example at the template's last placeholder: (prompt to generate from, reference)."""
    head, _ = split_template(template)
    return render(head, row), str(row[template_fields(template)[-1]])


def resolve_template(config: DataConfig, model_dir: Path) -> str:
    """The template a run uses: the one given, else the model's own chat template, else a Phi-3 style one."""
    if config.template:
        return config.template
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return chat_format_template(tokenizer, config.prompt_field, config.response_field) or \
        DEFAULT_TEMPLATE.replace("{prompt}", "{%s}" % config.prompt_field).replace(
            "{response}", "{%s}" % config.response_field)


def local_data_file(location: str) -> Path:
    """The data file at ``location`` on this host: the path itself, or a fresh download of a URL.

    A URL is fetched on every call (a scheduled run must read the current data) into
    ``$OLIVEFLOW_HOME/data-cache/`` through a temp file and a rename; its content hash keys the stages.
    """
    if not is_url(location):
        return Path(location.removeprefix("file://")).expanduser().resolve()
    fs, path = url_filesystem(location, "data file")
    folder = host_copies("data-cache", location)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".get-")
    os.close(fd)
    try:
        fs.get_file(path, tmp)
        target = folder / (location.rstrip("/").rsplit("/", 1)[-1] or "data.jsonl")
        os.replace(tmp, target)
    except FileNotFoundError:
        raise InputError(f"data file {location} does not exist; pass an existing JSONL file "
                         "(--data / data.train_path)") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def validate_data(config: DataConfig, tokenizer=None) -> DataReport:
    """Check the data files against the template; report sizes (token lengths when a tokenizer is given)."""
    fields = config.fields()
    train_path = local_data_file(config.train_path)
    eval_path = local_data_file(config.eval_path) if config.eval_path else None
    train = read_examples(train_path, fields, shown=config.train_path)
    evals = read_examples(eval_path, fields, shown=config.eval_path) if eval_path else []
    texts = ["".join(str(row[f]) for f in fields) for row in train]
    lengths = [len(t) for t in texts]
    tokens = [len(tokenizer(t)["input_ids"]) for t in texts] if tokenizer is not None else None
    return DataReport(
        train_path=train_path,
        eval_path=eval_path,
        train_sha256=file_sha256(train_path),
        eval_sha256=file_sha256(eval_path) if eval_path else None,
        fields=fields,
        rows=len(train),
        eval_rows=len(evals),
        chars_min=min(lengths),
        chars_median=statistics.median(lengths),
        chars_max=max(lengths),
        tokens_median=statistics.median(tokens) if tokens else None,
        tokens_max=max(tokens) if tokens else None,
    )
