"""``--param DOTTED.KEY=VALUE`` overrides and the one-line form of a parameter error.

One syntax for ``oliveflow run|stage --param`` (oliveflow/cli.py) and ``python -m deployments.deploy --param``:
the key is a dotted path into ``PipelineParams``, the value is JSON where it parses as JSON, else text.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from oliveflow.errors import InputError

if TYPE_CHECKING:
    from oliveflow.config import PipelineParams


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``dotted`` "a.b.c", creating the levels; InputError where a level already
    holds a whole value."""
    *parents, leaf = dotted.split(".")
    for depth, name in enumerate(parents, start=1):
        tree = tree.setdefault(name, {})
        if not isinstance(tree, dict):
            group = ".".join(parents[:depth])
            raise InputError(f"--param {dotted}: {group} was already given a whole value; set either {group}=... "
                             f"or its fields ({group}.NAME=...), not both")
    tree[leaf] = value


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def add_params(tree: dict, items: list[str]) -> dict[tuple[str, ...], str]:
    """Set each ``KEY=VALUE`` of ``items`` in ``tree``; return the values JSON turned into something else than
    text, as written, by key path (``validate_params`` retries them as text where a field takes text)."""
    texts: dict[tuple[str, ...], str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--param {item!r} is not key=value; write e.g. --param finetune.r=8")
        parsed = _value(value)
        set_dotted(tree, key.strip(), parsed)
        if not isinstance(parsed, str):
            texts[tuple(key.strip().split("."))] = value
    return texts


def validate_params(raw: dict, texts: dict[tuple[str, ...], str] | None = None) -> PipelineParams:
    """``PipelineParams`` of ``raw``; ``--param registry.version=2`` means the text "2" where a field takes text:
    those of ``texts`` are retried as written."""
    from oliveflow.config import PipelineParams

    try:
        return PipelineParams.model_validate(raw)
    except ValidationError as exc:
        refused = {loc for loc in (tuple(map(str, error["loc"])) for error in exc.errors()
                                   if error["type"] in ("string_type", "path_type")) if loc in (texts or {})}
        if not refused:
            raise
        for key in refused:
            set_dotted(raw, ".".join(key), texts[key])
        return PipelineParams.model_validate(raw)


def one_line(error: ValidationError, what: str = "parameter") -> str:
    """The first error of ``error`` in one line: ``invalid parameter finetune.r: <message>``; an unknown name of
    ``PipelineParams`` gets the closest valid ones instead of pydantic's "Extra inputs are not permitted"."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden" and error.title == "PipelineParams":
        return single_line(f"unknown {what} {where}; {suggest(where)}")
    message = first["msg"].removeprefix("Value error, ")
    return single_line(f"invalid {what} {where}: {message}" if where else f"invalid {what}s: {message}")


def suggest(name: str) -> str:
    """"did you mean ...?" for an unknown dotted parameter name: the closest valid names beside it, else a field of
    that name elsewhere, else the valid names at that level."""
    from difflib import get_close_matches

    from oliveflow.config import parameter_fields

    paths = [path for path, _ in parameter_fields()]
    groups = {path.rsplit(".", depth)[0] for path in paths for depth in range(1, path.count(".") + 1)}
    group, _, leaf = name.rpartition(".")
    while group and group not in groups:  # the typo is in a group's name: look one level up
        group, _, leaf = group.rpartition(".")
    prefix = f"{group}." if group else ""
    beside = sorted({path[len(prefix):].split(".")[0] for path in paths if path.startswith(prefix)})
    close = [prefix + match for match in get_close_matches(leaf, beside, n=3, cutoff=0.6)]
    # A right name in the wrong place (--param learning_rate=...): the fields of that name.
    close = close or [path for path in paths if path.rsplit(".", 1)[-1] in get_close_matches(
        leaf, {path.rsplit(".", 1)[-1] for path in paths}, n=1, cutoff=0.8)]
    if close:
        return f"did you mean {' or '.join(close)}? (oliveflow params lists them all)"
    where = f"under {group}" if group else "at the top level"
    return f"valid names {where}: {', '.join(beside)} (oliveflow params lists them all)"


def single_line(text: str) -> str:
    """``text`` with every line break escaped: an error names user input, which may hold any character."""
    return _LINE_BREAKS.sub(lambda match: repr(match.group())[1:-1], text)


_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")  # where str.splitlines() breaks
