"""Whether accelerate launch asked for FSDP (its settings, from the environment it sets) and the options
that do not combine with it: read before the sharding code is imported (see sharding.py)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

CONFIG_HINT = "see examples/accelerate/fsdp.yaml and docs/runs.md"


class ShardingError(ValueError):
    pass


@dataclass(frozen=True)
class FsdpSettings:
    reshard_after_forward: bool = True
    offload_params: bool = False
    activation_checkpointing: bool = False


def _flag(environ, name: str, default: bool) -> bool:
    return environ.get(name, str(default)).strip().lower() in ("true", "1", "yes")


def fsdp_settings(environ=os.environ) -> FsdpSettings | None:
    """The FSDP settings accelerate launch was given, or None when it was not asked for FSDP."""
    if not _flag(environ, "ACCELERATE_USE_FSDP", False):
        return None
    version = environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ShardingError(
            f"the accelerate config asks for FSDP version {version}; training shards with FSDP2 "
            f"(fully_shard): set fsdp_version: 2 in its fsdp_config ({CONFIG_HINT})"
        )
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().upper()
    return FsdpSettings(
        reshard_after_forward=reshard not in ("FALSE", "0", "SHARD_GRAD_OP", "NO_SHARD"),
        offload_params=_flag(environ, "FSDP_OFFLOAD_PARAMS", False),
        activation_checkpointing=_flag(environ, "FSDP_ACTIVATION_CHECKPOINTING", False),
    )


def check_fsdp_options(args: argparse.Namespace, mixed_precision: str) -> None:
    """Before anything loads: the options that do not combine with FSDP, each with what to use instead."""
    refusals = [
        (
            args.blocks_to_swap,
            "--blocks_to_swap moves whole blocks between CPU and GPU, while FSDP keeps a shard of every "
            "block on each GPU: leave out --blocks_to_swap (FSDP already divides the weights by the number "
            "of processes; fsdp_offload_params: true keeps the shards in CPU memory)",
        ),
        (
            args.fp8_base,
            "--fp8_base weights (float8 with per-block scales) are not sharded: leave out --fp8_base (FSDP "
            "divides the bf16 weights by the number of processes) or train without FSDP",
        ),
        (
            mixed_precision == "fp16",
            "fp16 training needs a gradient scaler that knows the shards: use --mixed_precision bf16 (or no)",
        ),
        (
            getattr(args, "scale_weight_norms", None),
            "--scale_weight_norms needs each LoRA module whole on one process: train without FSDP to use it",
        ),
        (
            args.gradient_checkpointing_cpu_offload,
            "--gradient_checkpointing_cpu_offload is not combined with FSDP: use --gradient_checkpointing alone",
        ),
        (
            getattr(args, "vram", None),
            "--vram picks one GPU's options (fp8, block swap, activation offload), which FSDP does not take: "
            "leave out --vram (FSDP divides the weights by the number of processes; see docs/runs.md)",
        ),
    ]
    for refused, message in refusals:
        if refused:
            raise ShardingError(f"FSDP: {message}")
