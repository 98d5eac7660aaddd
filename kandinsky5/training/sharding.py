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

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

from kandinsky5.training.fsdp_options import FsdpSettings
from modules.sharded_tensors import is_sharded
from networks.adapter_network import AdapterNetwork


def shard_dit(dit: nn.Module, network: AdapterNetwork, device: torch.device, settings: FsdpSettings) -> None:
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
