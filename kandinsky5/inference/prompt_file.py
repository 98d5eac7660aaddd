"""Prompt files: one prompt per line, with optional per-line settings in musubi-tuner's format.

    A cat walks on the grass --w 768 --h 512 --f 121 --d 42 --s 50 --g 5.0 --n blurry --i first.png

--w width, --h height, --f frames, --d seed, --s steps, --g guidance, --n negative prompt,
--i image (I2V first frame / I2I source), --ei the I2V last frame (musubi-tuner's end-image key),
--expand on|off (prompt expansion for this line; ours, musubi-tuner has no expansion). Empty lines and
lines starting with # are skipped.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from modules.option_types import FINITE, FRAMES, NON_NEGATIVE_INT, SIDE, STEPS


class PromptFileError(ValueError):
    pass


@dataclass
class PromptLine:
    prompt: str
    line: int
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    image: str | None = None
    image_last: str | None = None
    expand_prompt: bool | None = None


def on_off(text: str) -> bool:
    """A switch's value: on/off, yes/no, true/false or 1/0."""
    value = text.strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise ValueError(f"expected on or off, got {text!r}")


OPTIONS = {
    "w": ("width", SIDE),
    "h": ("height", SIDE),
    "f": ("frames", FRAMES),
    "d": ("seed", NON_NEGATIVE_INT),
    "s": ("steps", STEPS),
    "g": ("guidance", FINITE),
    "n": ("negative_prompt", str),
    "i": ("image", str),
    "ei": ("image_last", str),
    "expand": ("expand_prompt", on_off),
}
_OPTION = re.compile(r"(?:^|\s)--([a-z]+)(?=\s|$)")


def parse_prompt_line(text: str, line: int, source: str = "prompt file") -> PromptLine:
    pieces = _OPTION.split(text.strip())
    prompt, result = pieces[0].strip(), {}
    if not prompt:
        raise PromptFileError(f"{source}, line {line}: no prompt before the options")
    for name, value in zip(pieces[1::2], pieces[2::2], strict=True):
        if name not in OPTIONS:
            known = ", ".join(f"--{k}" for k in OPTIONS)
            raise PromptFileError(f"{source}, line {line}: unknown option --{name} (known: {known})")
        field, kind = OPTIONS[name]
        value = value.strip()
        try:
            result[field] = kind(value)
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise PromptFileError(f"{source}, line {line}: --{name}: {error}") from None
    return PromptLine(prompt=prompt, line=line, **result)


def read_prompt_file(path: str | Path) -> list[PromptLine]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PromptFileError(f"cannot read prompt file {path}: {error}") from None
    lines = [
        parse_prompt_line(line, number, str(path))
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise PromptFileError(f"prompt file {path} has no prompts")
    return lines
