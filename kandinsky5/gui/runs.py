"""Running a command's entry point from the UI: its argv, its error message as the UI's error."""

from __future__ import annotations

import contextlib
import io


class CommandFailed(Exception):
    pass


def run_command(main, argv: list[str]) -> str:
    """``main(argv)`` of a script, as the command line runs it; returns what it printed. Its ``error:``
    exit (bad paths, options) becomes CommandFailed with the same message."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            main(argv)
    except SystemExit as stop:
        if stop.code not in (0, None):
            message = stop.code if isinstance(stop.code, str) else printed.getvalue().strip().splitlines()[-1:]
            raise CommandFailed(str(message[0] if isinstance(message, list) and message else message)) from None
    return printed.getvalue()
