"""Errors a person can act on: one line naming the input, the problem and the fix."""

from __future__ import annotations

from collections.abc import Iterator


def causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or during (clients wrap the error that tells what happened)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


class InputError(ValueError):
    """Bad user input, detected before heavy work starts."""


class StageError(RuntimeError):
    """A stage ran but produced no usable output (Olive's exit-0 failures end up here)."""


class ServiceError(RuntimeError):
    """A service the run needs (the Prefect API, a tracking server) is not reachable; the message says what to do."""
