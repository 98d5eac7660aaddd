"""Tensors that may be shards (DTensors of FSDP2) seen whole, and whole tensors cut like a shard."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor: gathered from every process for a shard (all processes must call this
    together), the tensor itself otherwise."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shaped_like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``full`` as ``reference`` holds it: this process's shard when ``reference`` is sharded (each
    process cuts its own part of the same full value, no communication), else ``full`` itself."""
    if not isinstance(reference, DTensor):
        return full
    local = full.to(reference.device_mesh.device_type, reference.dtype)
    return distribute_tensor(local, reference.device_mesh, reference.placements, src_data_rank=None)


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)
