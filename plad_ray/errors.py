"""Errors a user can fix, each with its own exit code.

Every entry point catches these and prints one line naming the input and the fix
(`jobs/cli.py`). Anything else is a bug or a runtime failure and exits with
`RuntimeFailure.exit_code`.
"""

from contextlib import contextmanager


class PladError(Exception):
    """Base of user-facing errors; the message is the whole story, one line."""

    exit_code = 1


class ConfigError(PladError):
    """A config file, key, value or combination is wrong."""

    exit_code = 2


class DataError(PladError):
    """An input (prompt file, model folder, output location) is missing or malformed."""

    exit_code = 3


class RuntimeFailure(PladError):
    """The run started but a stage failed (engine crash, training error)."""

    exit_code = 4


@contextmanager
def stage(name: str):
    """Mark a failure inside with the stage it happened in (the innermost), for the error line of
    jobs/cli.py: "runtime failure in <stage>: ...". The exception itself goes on unchanged."""
    try:
        yield
    except BaseException as e:
        if not hasattr(e, "plad_stage"):
            try:
                e.plad_stage = name
            except AttributeError:  # an exception type that takes no attributes: the line names no stage
                pass
        raise
