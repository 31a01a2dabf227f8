"""Errors a user causes (a config key, a data file, a launch, a checkpoint path, data that is all bad) and how the
entry points report them.

Their messages already say what is wrong, what to do and which TROUBLESHOOTING.md entry covers it, so a command
prints the message alone, without a traceback, and exits non-zero: 2 for input it could not use, 1 for a run that
failed on its data. `VLM_TRACEBACK=1` (or Hydra's `HYDRA_FULL_ERROR=1`) shows the traceback as well.
"""

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def with_entry(message: str, anchor: str) -> str:
    """`message` ending with a pointer to a TROUBLESHOOTING.md entry, unless it names one already."""
    if "TROUBLESHOOTING.md#" in message:
        return message
    message = message.rstrip()
    return f"{message}{'' if message.endswith(('.', '?', '!')) else '.'} See TROUBLESHOOTING.md#{anchor}."


class UserError(Exception):
    exit_code = 2


class DataFileError(UserError, ValueError):
    """A data file that is missing, or not records in a format we read."""

    def __init__(self, message: str):
        super().__init__(with_entry(message, "a-data-file-that-is-missing-or-not-records"))


def wants_traceback() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in ("VLM_TRACEBACK", "HYDRA_FULL_ERROR"))


def report(err: UserError) -> int:
    """Print `err` as one line (or raise it again when a traceback is wanted); its exit code."""
    if wants_traceback():
        raise err
    print(f"error: {err}", file=sys.stderr)
    return err.exit_code


@contextmanager
def reported_as_message() -> Iterator[None]:
    """A UserError inside ends the command: its message on stderr, its exit code."""
    try:
        yield
    except UserError as err:
        sys.exit(report(err))
