"""Running a command's entry point from the UI: its argv, its error message as the UI's error."""

from __future__ import annotations

import contextlib
import io
import sys


class CommandFailed(Exception):
    """A script's error exit: its message, and what it printed before (a caching summary, say)."""

    def __init__(self, message: str, printed: str = ""):
        super().__init__(message)
        self.printed = printed


class _Copied(io.StringIO):
    """Keeps what is written and passes it on (progress bars still reach the terminal)."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        return super().write(text)

    def flush(self) -> None:
        self.stream.flush()


def run_command(main, argv: list[str]) -> str:
    """``main(argv)`` of a script, as the command line runs it; returns what it printed. Its ``error:``
    exit (bad paths, options) becomes CommandFailed with the same message."""
    printed, complaints = io.StringIO(), _Copied(sys.stderr)
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(complaints):
            main(argv)
    except SystemExit as stop:
        if stop.code not in (0, None):  # sys.exit("error: ...") or argparse's "prog: error: ..." on stderr
            said = complaints.getvalue().strip().splitlines() or printed.getvalue().strip().splitlines()
            message = stop.code if isinstance(stop.code, str) else (said[-1] if said else f"exit status {stop.code}")
            raise CommandFailed(message, printed.getvalue()) from None
    return printed.getvalue()
