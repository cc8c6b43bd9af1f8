"""validate_data: every line parsed and checked against the fields the template uses."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import tempfile
from pathlib import Path

from oliveflow.config import DEFAULT_TEMPLATE, DataConfig, oliveflow_home, template_fields
from oliveflow.errors import InputError, causes
from oliveflow.hashing import config_sha256, file_sha256, library_versions
from oliveflow.results import DataReport
from oliveflow.sft import chat_format_template, render, split_template
from oliveflow.store import host_copies, is_url, url_filesystem


def read_examples(path: Path, fields: list[str], shown: str | Path | None = None) -> list[dict]:
    """Parse a JSONL file; raise InputError naming the file (as ``shown``, e.g. its URL), line and fix on the first
    bad line."""
    path = Path(path)
    name = str(shown or path)
    name = name if name.isprintable() else repr(name)  # the message stays one line
    if not path.is_file():
        raise InputError(f"data file {name} does not exist; pass an existing JSONL file (--data / data.train_path)")
    rows = []
    # The fine-tune reads the same file with Hugging Face datasets (pyarrow): what it would refuse, or read
    # differently, is refused here with its line, before any heavy stage. A BOM at the start is fine for
    # both; invalid UTF-8 is kept as surrogate escapes so it can be reported with its line.
    try:
        f = open(path, encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise InputError(f"data file {name} cannot be read ({exc.strerror}); pass a readable JSONL file") from None
    with f:
        for number, line in enumerate(f, start=1):
            if not line.strip(_JSON_WHITESPACE):
                continue
            where = f"{name}:{number}"
            bad_byte = _UNDECODABLE.search(line)
            if bad_byte:
                raise InputError(f"{where}: not valid UTF-8 (byte 0x{ord(bad_byte.group()) - 0xDC00:02x} at column "
                                 f"{bad_byte.start() + 1}); save the file as UTF-8")
            try:
                row = json.loads(line, object_pairs_hook=_unique_keys, parse_float=_double)
            except _DuplicateKey as exc:
                raise InputError(f"{where}: key {_field(exc.args[0])} appears twice in one object; "
                                 "keep one of them") from None
            except _NotADouble as exc:
                raise InputError(f"{where}: number {exc.args[0][:30]} does not fit a double (the fine-tune's reader "
                                 "cannot take it); write it as a string or a smaller number") from None
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                 "write one JSON object per line") from None
            except (ValueError, RecursionError) as exc:  # an integer of thousands of digits, nesting too deep
                problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
                raise InputError(f"{where}: JSON value cannot be read ({problem}); "
                                 "write one flat JSON object of text fields per line") from None
            if not isinstance(row, dict):
                raise InputError(f"{where}: expected a JSON object, got {_JSON_TYPES.get(type(row), 'a value')}; "
                                 "write one JSON object per line")
            for field in fields:
                value = row.get(field)
                if value in (None, ""):
                    raise InputError(f"{where}: field {_field(field)} used by the template is missing or empty; "
                                     "add it to every line or change the template (fields used: "
                                     f"{', '.join(map(_field, fields))})")
                if not isinstance(value, str):
                    raise InputError(f"{where}: field {_field(field)} is {_JSON_TYPES.get(type(value), 'a value')}, "
                                     "not a string; write the text the template inserts as a JSON string")
            problem = _structure_problem(row, "\\u" in line)
            if problem:
                raise InputError(f"{where}: {problem}")
            rows.append(row)
    if not rows:
        raise InputError(f"data file {name} has no examples; add JSONL lines with fields "
                         f"{', '.join(map(_field, fields))}")
    return rows


MAX_NESTING = 63  # objects/arrays inside each other, the line's own object included: pyarrow's limit
_JSON_WHITESPACE = " \t\r\n"  # what JSON and pyarrow skip; str.strip() would also skip e.g. U+00A0
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # surrogateescape's stand-ins for bytes that are not UTF-8
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "true/false"}


class _DuplicateKey(ValueError):
    pass


class _NotADouble(ValueError):
    pass


def _double(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: Python reads inf, pyarrow refuses the file
        raise _NotADouble(text)
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    row = dict(pairs)
    if len(row) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return row


def _structure_problem(row: dict, surrogates: bool) -> str | None:
    """What in a parsed line pyarrow (the fine-tune's reader) or a tokenizer would refuse: nesting deeper than
    Arrow's limit, or (when the line has \\u escapes) a key or string with half a surrogate pair."""
    stack: list[tuple[object, int]] = [(row, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if surrogates and _SURROGATE.search(item):
                return ("a \\u escape is half a surrogate pair (not a character); "
                        "fix the escape or write the character itself")
        elif isinstance(item, (dict, list)):
            if depth > MAX_NESTING:
                return (f"JSON nested more than {MAX_NESTING} levels deep (the fine-tune's reader stops there); "
                        "flatten the value or drop the field")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


def check_finetune_can_read(path: Path, shown: str | Path | None = None, sha256: str | None = None) -> None:
    """Refuse, up front, a file the fine-tune's reader cannot read: Hugging Face datasets' JSON builder, as Olive
    calls it for training and calibration data. It infers an Arrow type for every field, the ones the template does
    not use included, and fails on some files Python's json reads (a field with mixed types and a blank line above
    it; a list of nulls and whitespace after the last line), after quantization has run.

    A file that passed is remembered by its content and the reader's versions (``$OLIVEFLOW_HOME/read-checks``):
    every run checks its data twice (before the flow and in it), and importing the reader and loading cost ~2 s.
    """
    passed = oliveflow_home() / "read-checks" / config_sha256(
        sha256 or file_sha256(path), library_versions(("datasets", "pyarrow")))
    if passed.is_file():
        return
    import logging

    import datasets
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    name = str(shown or path)
    name = name if name.isprintable() else repr(name)
    bars_were_off, verbosity = are_progress_bars_disabled(), datasets.logging.get_verbosity()
    disable_progress_bars()  # its bars and error log would break the one-line error on stderr
    datasets.logging.set_verbosity(logging.CRITICAL + 1)
    try:
        with tempfile.TemporaryDirectory(prefix="oliveflow-read-check-") as cache:
            rows = datasets.load_dataset("json", data_files=[str(path)], split="train", cache_dir=cache)
            for _ in rows:  # each row decoded, every field too, as the fine-tune's map over the rows does
                pass
    except Exception as exc:  # whatever it raises here, the fine-tune would raise after quantizing
        chain = list(causes(exc))
        reason = next((c for c in chain if "Arrow" in type(c).__name__), exc)  # pyarrow's says most
        text = " ".join(str(reason).split())[:200] or type(reason).__name__
        raise InputError(f"data file {name}: the fine-tune's reader (Hugging Face datasets) cannot read it "
                         f"({text}); give each field one JSON type on every line, drop the fields the template "
                         "does not use, or remove blank lines") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            enable_progress_bars()
    with contextlib.suppress(OSError):  # a home that cannot be written only costs the check next time
        passed.parent.mkdir(parents=True, exist_ok=True)
        passed.touch()


def _field(name: str) -> str:
    return repr(name) if len(name) <= 60 else repr(name[:60]) + "..."


def prompt_and_reference(template: str, row: dict) -> tuple[str, str]:
    """Split a rendered example at the template's last placeholder: (prompt to generate from, reference)."""
    head, _ = split_template(template)
    return render(head, row), str(row[template_fields(template)[-1]])


def resolve_template(config: DataConfig, model_dir: Path) -> str:
    """The template a run uses: the one given, else the model's own chat template, else a Phi-3 style one."""
    if config.template:
        return config.template
    # format, not two replaces: with prompt_field "response" the second replace would rewrite the first's result.
    default = DEFAULT_TEMPLATE.format(prompt="{%s}" % config.prompt_field, response="{%s}" % config.response_field)
    if not _has_chat_template(Path(model_dir)):
        return default  # what the tokenizer would say, without importing transformers and torch (~3 s)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return chat_format_template(tokenizer, config.prompt_field, config.response_field) or default


def _has_chat_template(model_dir: Path) -> bool:
    """Whether a model folder holds a chat template where transformers' tokenizer loading looks for one:
    ``chat_template.jinja``, ``additional_chat_templates/*.jinja``, ``chat_template`` in tokenizer_config.json
    (an unreadable config counts as having one: the tokenizer then says what is wrong)."""
    if (model_dir / "chat_template.jinja").is_file() or any(model_dir.glob("additional_chat_templates/*.jinja")):
        return True
    config = model_dir / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template")) if config.is_file() else False
    except (OSError, ValueError, AttributeError):
        return True


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
    train_sha256 = file_sha256(train_path)
    # the eval file is read with read_examples alone
    check_finetune_can_read(train_path, shown=config.train_path, sha256=train_sha256)
    evals = read_examples(eval_path, fields, shown=config.eval_path) if eval_path else []
    texts = ["".join(str(row[f]) for f in fields) for row in train]
    lengths = [len(t) for t in texts]
    tokens = [len(tokenizer(t)["input_ids"]) for t in texts] if tokenizer is not None else None
    return DataReport(
        train_path=train_path,
        eval_path=eval_path,
        train_sha256=train_sha256,
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
