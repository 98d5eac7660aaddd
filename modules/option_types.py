"""Checked number types for command-line options, prompt-file options and config-file values.

``integer(low, high)`` and ``number(low, high)`` make argparse types that accept a value only inside
its range (bounds inclusive unless the ``*_open`` flag says otherwise; numbers must be finite), so
every numeric option states its range once, where it is declared, and a bad value stops the command
before anything loads with argparse's message naming the option: ``argument --steps: '0' is out of
range: expected an integer in [1, 1000]``. ``annotate_ranges`` adds each range to the help texts.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
from collections.abc import Callable


class ScriptParser(argparse.ArgumentParser):
    """argparse with short errors: one line naming the problem (an unknown option with the nearest known
    one, "did you mean"), after a one-line usage pointing at --help instead of the whole option list."""

    def __init__(self, *args, **kwargs):
        # a one-line usage: every option is listed, with its help, below it (in full, it ran to 140 lines)
        kwargs.setdefault("usage", "%(prog)s [options]")
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        unknown = re.fullmatch(r"unrecognized arguments: (.*)", message)
        if unknown:
            known = [option for option in self._option_string_actions if option.startswith("--")]
            parts = []
            for word in unknown[1].split():
                if not word.startswith("-"):
                    continue
                close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.7)
                parts.append(f"{word} (did you mean {close[0]}?)" if close else word)
            message = f"unknown option(s): {', '.join(parts) or unknown[1]}"
        self.exit(2, f"usage: {self.prog} [options]  ({self.prog} --help lists them)\n{self.prog}: error: {message}\n")


class _Range:
    """The accepted interval of a type, in words ("an integer >= 1", "a number in (0, 1]")."""

    def __init__(self, kind: str, low, high, low_open: bool, high_open: bool):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open

    def contains(self, value) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{self.kind} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{self.kind} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{self.kind} {'<' if self.high_open else '<='} {self.high:g}"
        return f"a finite {self.kind.split()[-1]}" if self.kind.endswith("number") else self.kind


def _checked(parse: Callable[[str], object], interval: _Range) -> Callable[[str], object]:
    def convert(text) -> object:
        if isinstance(text, bool):  # from a config file: true/false is not a number
            raise argparse.ArgumentTypeError(f"{text!r} is not {interval.kind}")
        try:
            value = parse(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {interval.kind}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not finite: expected {interval}")
        if not interval.contains(value):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: expected {interval}")
        return value

    convert.__name__ = interval.kind  # argparse names the type in its own messages
    convert.range = interval
    return convert


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    return _checked(int, _Range("an integer", low, high, False, False))


def number(
    low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    return _checked(float, _Range("a number", low, high, low_open, high_open))


POSITIVE_INT = integer(1)
NON_NEGATIVE_INT = integer(0)
POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
FINITE = number()
# generation sizes (the sizes module checks multiples and the task's limits)
SIDE = integer(16, 8192)
FRAMES = integer(1, 1025)
STEPS = integer(1, 1000)


def annotate_ranges(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add each checked option's range to its help text, so --help states every range."""
    for action in parser._actions:
        interval = getattr(action.type, "range", None)
        if interval is not None and action.help is not argparse.SUPPRESS:
            action.help = f"{action.help or ''} [{interval}]".strip()
    return parser


def convert_config_value(parser: argparse.ArgumentParser, dest: str, value):
    """A value of ``dest`` from a config file, checked by the option's type as if typed on the command
    line (a list for options taking several values); raises ValueError naming the option."""
    action = next(a for a in parser._actions if a.dest == dest)
    if action.type is None or action.type is str:
        return value
    option = action.option_strings[0] if action.option_strings else dest
    try:
        if isinstance(value, list):
            return [action.type(item) for item in value]
        return action.type(value)
    except (argparse.ArgumentTypeError, ValueError) as error:
        raise ValueError(f"{option}: {error}") from None
