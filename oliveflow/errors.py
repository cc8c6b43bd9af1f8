"""Errors a person can act on: one line naming the input, the problem and the fix."""


class InputError(ValueError):
    """Bad user input, detected before heavy work starts."""


class StageError(RuntimeError):
    """A stage ran but produced no usable output (Olive's exit-0 failures end up here)."""


class ServiceError(RuntimeError):
    """A service the run needs (the Prefect API, a tracking server) is not reachable; the message says what to do."""
