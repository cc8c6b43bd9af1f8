"""validate_data: every line parsed and checked against the fields the template uses."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from oliveflow.config import DataConfig, template_fields
from oliveflow.errors import InputError
from oliveflow.hashing import file_sha256
from oliveflow.results import DataReport


def read_examples(path: Path, fields: list[str]) -> list[dict]:
    """Parse a JSONL file; raise InputError naming the file, line and fix on the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist; pass an existing JSONL file (--data / data.train_path)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not valid JSON ({exc.msg}); "
                                 "write one JSON object per line") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}; "
                                 "write one JSON object per line")
            missing = [name for name in fields if row.get(name) in (None, "")]
            if missing:
                raise InputError(f"{path}:{number}: field {missing[0]!r} used by the template is missing or empty; "
                                 f"add it to every line or change the template (fields used: {', '.join(fields)})")
            rows.append(row)
    if not rows:
        raise InputError(f"data file {path} has no examples; add JSONL lines with fields {', '.join(fields)}")
    return rows


def render(template: str, row: dict) -> str:
    return template.format(**{k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()})


def prompt_and_reference(template: str, row: dict) -> tuple[str, str]:
    """Split a rendered example at the template's last placeholder: (prompt to generate from, reference)."""
    last = template_fields(template)[-1]
    head = template[: template.rindex("{" + last)]
    return render(head, row), str(row[last])


def validate_data(config: DataConfig, tokenizer=None) -> DataReport:
    """Check the data files against the template; report sizes (token lengths when a tokenizer is given)."""
    fields = template_fields(config.template)
    train = read_examples(config.train_path, fields)
    evals = read_examples(config.eval_path, fields) if config.eval_path else []
    texts = [render(config.template, row) for row in train]
    lengths = [len(t) for t in texts]
    tokens = [len(tokenizer(t)["input_ids"]) for t in texts] if tokenizer is not None else None
    return DataReport(
        train_path=Path(config.train_path).resolve(),
        eval_path=Path(config.eval_path).resolve() if config.eval_path else None,
        train_sha256=file_sha256(config.train_path),
        eval_sha256=file_sha256(config.eval_path) if config.eval_path else None,
        fields=fields,
        rows=len(train),
        eval_rows=len(evals),
        chars_min=min(lengths),
        chars_median=statistics.median(lengths),
        chars_max=max(lengths),
        tokens_median=statistics.median(tokens) if tokens else None,
        tokens_max=max(tokens) if tokens else None,
    )
