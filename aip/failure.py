"""UFO's failure Result: the text a failed command answers with, on the wire and to an agent.

It is wire contract, not a dispatcher's choice: a UFO agent reads the
``result`` of a failed command as an instruction ("please retry or execute a
different command"), and our tools split the ``error`` back into the command
it quotes and the cause. Every failure Result in the project, controller and
device alike, is built here.
"""

from __future__ import annotations

from .messages import Command, Result, ResultStatus

__all__ = ["describe", "error_result", "failure_cause"]


def _prefix(command: Command) -> str:
    return f"Error occurred while executing command {command}: "


def describe(error: BaseException) -> str:
    """One line naming the cause, never empty: ``"Kind: message"``.

    The kind is the error's ``kind`` when it names one (a dispatcher's
    ``CommandError``: "TimeoutError", "ToolError"), else its class name.
    """
    kind = getattr(error, "kind", None)
    kind = kind if isinstance(kind, str) else type(error).__name__
    message = str(error).strip() or repr(error)
    return f"{kind}: {message}"


def error_result(command: Command, cause: BaseException | str) -> Result:
    """A failure ``Result`` for ``command``: ``cause`` as given (``Kind: message``), or an error described."""
    message = _prefix(command) + (cause if isinstance(cause, str) else describe(cause))
    return Result(
        status=ResultStatus.FAILURE,
        error=message,
        result=f"{message}, please retry or execute a different command.",
        namespace=command.namespace,
        call_id=command.call_id,
    )


def failure_cause(command: Command, result: Result) -> str:
    """The cause part of a failure Result's error, without the command it quotes."""
    return (result.error or "").removeprefix(_prefix(command))
