"""Optimizers and learning-rate schedules from command-line style options."""

from __future__ import annotations

import ast
import importlib
import re

import torch

BUILT_IN = ("AdamW", "AdamW8bit", "Adafactor")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def parse_optimizer_args(values: list[str] | None) -> dict:
    """``key=value`` strings with Python-literal values (``betas=(0.9,0.95)``, ``weight_decay=0.01``)."""
    parsed = {}
    for text in values or []:
        key, sep, value = text.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"--optimizer_args {text!r}: expected key=value, for example weight_decay=0.01")
        try:
            parsed[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(
                f"--optimizer_args {text!r}: {value.strip()!r} is not a Python literal "
                "(a number, True/False, a tuple such as (0.9,0.95), or a quoted string)"
            ) from None
    return parsed


def _optimizer_class(name: str, device: torch.device):
    lowered = name.lower()
    if lowered == "adamw":
        return torch.optim.AdamW
    if lowered == "adamw8bit":
        if device.type != "cuda":
            raise ValueError("--optimizer_type AdamW8bit needs a CUDA GPU (bitsandbytes); use AdamW on this device")
        try:
            import bitsandbytes
        except ImportError:
            raise ValueError("--optimizer_type AdamW8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bitsandbytes.optim.AdamW8bit
    if lowered == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    module_name, _, class_name = name.rpartition(".")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", name):
        choices = ", ".join(BUILT_IN)
        raise ValueError(
            f"unknown --optimizer_type {name!r}: expected {choices}, or a class path such as "
            "torch.optim.SGD or prodigyopt.Prodigy"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--optimizer_type {name!r} cannot be imported: {error}") from None
    # only an optimizer class is ever called: a dotted name of any other callable (os.system) is refused
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"--optimizer_type {name!r} is not an optimizer: expected a torch.optim.Optimizer subclass")
    return cls


def create_optimizer(
    name: str, groups: list[dict], learning_rate: float, args: list[str] | None, device: torch.device
) -> torch.optim.Optimizer:
    cls = _optimizer_class(name, device)
    kwargs = parse_optimizer_args(args)
    if name.lower() == "adafactor":  # a fixed learning rate, as the schedule below sets it
        kwargs = {"relative_step": False, "scale_parameter": False, "warmup_init": False, **kwargs}
    try:
        return cls(groups, lr=learning_rate, **kwargs)
    except TypeError as error:
        raise ValueError(f"--optimizer_args do not fit {cls.__name__}: {error}") from None


def warmup_steps(value: float, total_steps: int) -> int:
    """--lr_warmup_steps: a step count, or a fraction (< 1) of the total."""
    if value < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {value}")
    return int(value * total_steps) if 0 < value < 1 else int(value)


def create_scheduler(
    name: str, optimizer: torch.optim.Optimizer, warmup: int, total_steps: int, num_cycles: int = 1, power: float = 1.0
):
    from transformers import get_scheduler

    if name not in SCHEDULERS:
        raise ValueError(f"unknown --lr_scheduler {name!r}: expected one of {', '.join(SCHEDULERS)}")
    if name == "constant" and warmup:
        name = "constant_with_warmup"  # a warmup was asked for: honour it
    specific = {"cosine_with_restarts": {"num_cycles": num_cycles}, "polynomial": {"power": power}}.get(name)
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, scheduler_specific_kwargs=specific
    )
