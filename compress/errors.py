"""The one error type users see.

A ``CompressError`` is a mistake in what the user gave us (recipe, path, model pair, shape).
Its message is one line that names the problem and the fix; entry points print it without
a traceback and exit non-zero. Our own invariants use ``assert``.
"""


class CompressError(Exception):
    """User-facing error: one line, names the problem and the fix."""


class GateFailure(CompressError):
    """A quality gate declared in the recipe failed; the model was still exported and reported."""
