"""graphgrow's exception classes.

Every refusal or user error raised by graphgrow is a :class:`GraphGrowError`,
so callers can catch one class; the subclasses say what kind of problem it is.
The message is always one sentence that names the problem.
"""

from __future__ import annotations


class GraphGrowError(Exception):
    """Base class of every error graphgrow raises on purpose."""


class InvalidArgumentError(GraphGrowError, ValueError):
    """An argument is out of range or malformed (factor <= 1, bad regex, ...)."""


class InputMismatchError(GraphGrowError, ValueError):
    """Example inputs do not fit the model (wrong shape, dtype or count)."""


class TraceError(GraphGrowError):
    """The model could not be captured as a graph."""


class UnsupportedModelError(GraphGrowError):
    """The model (or file) is well formed but graphgrow cannot rewrite it."""


class VerificationError(GraphGrowError):
    """A rewritten model does not compute the same function as the original."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class ModelFileError(GraphGrowError):
    """A model file is missing, unreadable, truncated or not a valid model."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when the message is empty), for one-line errors
    that quote what a library (onnx, onnxruntime, torch) said."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def require_equivalent(check, what: str, report=None) -> None:
    """Raise :class:`VerificationError` naming the worst output when ``check`` (a CheckReport) did not pass.

    ``what`` names the model (``"widened"``, ``"deepened"``); ``report`` travels with the error."""
    if not check.passed:
        raise VerificationError(check.failure_message(what), report=report)
