"""Errors a person can act on: one line naming the input, the problem and the fix."""


class InputError(ValueError):
    """Bad user input, detected before heavy work starts."""


class StageError(RuntimeError):
    """A stage ran but produced no usable output (Olive's exit-0 failures end up here)."""
