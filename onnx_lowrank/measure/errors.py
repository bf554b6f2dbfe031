"""Errors of the onnxruntime measurements, and the one-line form of an exception.

Errors meant for the user (a missing file, an input the model does not have, a wrong shape, a
symbolic dimension left unset) raise :class:`InputError`; failures of the models themselves (a
model onnxruntime cannot load, run or convert) raise :class:`HarnessError`. The CLI turns them
into exit codes 2 and 1, each with a one-line message (:func:`one_line`).
"""

from __future__ import annotations

__all__ = ["HarnessError", "InputError", "one_line"]


class HarnessError(RuntimeError):
    """A model could not be loaded, run or converted (exit code 1 in the CLI)."""


class InputError(HarnessError, ValueError):
    """User-supplied inputs or options are wrong (exit code 2 in the CLI)."""


class MissingFileError(HarnessError, FileNotFoundError):
    """A model, inputs or labels file does not exist (an input failure: exit code 1 in the CLI,
    as for every subcommand)."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, cut to 300 characters.

    onnxruntime and protobuf put multi-line reasons (with C++ source locations) in their
    messages; a user-facing error stays one line.

    Parameters
    ----------
    exc : BaseException

    Returns
    -------
    str
    """
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."
