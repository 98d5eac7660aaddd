"""Optimizers and learning-rate schedules from command-line style options."""

from __future__ import annotations

import ast
import importlib
import re

import torch

BUILT_IN = ("AdamW", "AdamW8bit", "Adafactor")
SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "cosine_with_min_lr",
    "inverse_sqrt",
    "warmup_stable_decay",
)


def parse_optimizer_args(values: list[str] | None, option: str = "--optimizer_args") -> dict:
    """``key=value`` strings with Python-literal values (``betas=(0.9,0.95)``, ``weight_decay=0.01``)."""
    parsed = {}
    for text in values or []:
        key, sep, value = text.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"{option} {text!r}: expected key=value, for example weight_decay=0.01")
        try:
            parsed[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(
                f"{option} {text!r}: {value.strip()!r} is not a Python literal "
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


def _scheduler_class(path: str):
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", path):
        raise ValueError(f"--lr_scheduler_type {path!r}: expected a class path such as torch.optim.lr_scheduler.StepLR")
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--lr_scheduler_type {path!r} cannot be imported: {error}") from None
    # only a scheduler class is ever called
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.lr_scheduler.LRScheduler)):
        raise ValueError(f"--lr_scheduler_type {path!r} is not a learning-rate scheduler (torch LRScheduler subclass)")
    return cls


def create_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    warmup: int,
    total_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
    *,
    min_lr_ratio: float | None = None,
    timescale: int | None = None,
    decay_steps: int = 0,
    class_path: str | None = None,
    class_args: list[str] | None = None,
):
    """The schedule --lr_scheduler names (transformers' schedules), or --lr_scheduler_type's class
    built with --lr_scheduler_args."""
    from transformers import get_scheduler

    if class_path:
        cls = _scheduler_class(class_path)
        try:
            return cls(optimizer, **parse_optimizer_args(class_args, "--lr_scheduler_args"))
        except TypeError as error:
            raise ValueError(f"--lr_scheduler_args do not fit {cls.__name__}: {error}") from None
    if name not in SCHEDULERS:
        raise ValueError(f"unknown --lr_scheduler {name!r}: expected one of {', '.join(SCHEDULERS)}")
    if name == "constant" and warmup:
        name = "constant_with_warmup"  # a warmup was asked for: honour it
    specific = {
        "cosine_with_restarts": {"num_cycles": num_cycles},
        "polynomial": {"power": power},
        "cosine_with_min_lr": {"min_lr_rate": min_lr_ratio or 0.0},
        "inverse_sqrt": {"timescale": timescale} if timescale else {},
        "warmup_stable_decay": {
            "num_decay_steps": decay_steps,
            "num_stable_steps": max(0, total_steps - warmup - decay_steps),
            "min_lr_ratio": min_lr_ratio or 0.0,
        },
    }.get(name)
    if name == "warmup_stable_decay" and not decay_steps:
        raise ValueError("--lr_scheduler warmup_stable_decay needs --lr_decay_steps (a step count or a fraction)")
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, scheduler_specific_kwargs=specific
    )
