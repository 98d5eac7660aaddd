"""FSDP2: the DiT and its LoRA sharded over the training processes.

``accelerate launch --config_file examples/accelerate/fsdp.yaml`` asks for it: accelerate puts its
FSDP settings in the environment (ACCELERATE_USE_FSDP, FSDP_VERSION, FSDP_RESHARD_AFTER_FORWARD,
FSDP_OFFLOAD_PARAMS, FSDP_ACTIVATION_CHECKPOINTING), and this module applies PyTorch's own
``fully_shard`` to each transformer block, then to the rest of the DiT. accelerate's ``prepare``
is not used for the model: its FSDP2 path casts the weights to fp32 for its mixed-precision policy,
where training keeps the official precision map (bf16 blocks, fp32 time embedding and modulations),
and it would not see the LoRA, which is not a submodule of the DiT.

Each LoRA module is registered under the layer it adapts, so it is sharded with that layer's block:
its weights, gradients and optimizer state are split over the processes like the base weights.
Gradients are averaged by FSDP's reduce-scatter. Saving gathers the whole LoRA and optimizer state
(every process takes part, the first writes), so files and state folders are those of a run without
FSDP.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

from modules.sharded_tensors import is_sharded
from networks.lora_kandinsky import LoRANetwork

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


def shard_dit(dit: nn.Module, network: LoRANetwork, device: torch.device, settings: FsdpSettings) -> None:
    """Shard ``dit`` (with ``network`` applied to it) over all processes, block by block; the weights
    end up on ``device``, each process holding its share."""
    for lora, layer in network.targets(dit):
        layer.add_module("lora", lora)  # sharded, gathered and reduced with that layer's block
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options = {"mesh": mesh, "reshard_after_forward": settings.reshard_after_forward}
    if settings.offload_params:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for block in [*dit.text_transformer_blocks, *dit.visual_transformer_blocks]:
        fully_shard(block, **options)
    fully_shard(dit, **options)  # what lies outside the blocks: embeddings, output layer
    network.to(device)  # the LoRA's buffers (alpha)


def base_weight_bytes(dit: nn.Module) -> tuple[int, int]:
    """Bytes of the frozen base weights this process holds, and of the whole model."""
    held = total = 0
    for param in dit.parameters():
        if param.requires_grad:
            continue
        total += param.numel() * param.element_size()
        local = param.to_local() if is_sharded(param) else param
        held += local.numel() * local.element_size()
    return held, total
