"""Gradient checkpointing with the checkpointed activations kept in CPU memory.

Like gradient checkpointing, a block's forward runs without keeping its intermediate tensors; unlike
it, the block's inputs (the hidden states that checkpointing must keep, one per block) are copied to
CPU memory (pinned on CUDA) and the device copies are freed. In backward the inputs come back, the
block is recomputed (with the same random state, so dropout repeats) and its gradients flow on.
Parameters receive their gradients as usual. Non-tensor and nested (tuple) arguments are passed as
they are (the RoPE tables: shared and constant).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function: Callable, anchor: torch.Tensor, *args):
        ctx.function = function
        ctx.devices = [a.device if isinstance(a, torch.Tensor) else None for a in args]
        ctx.needs_grad = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
        pin = any(d is not None and d.type == "cuda" for d in ctx.devices)
        ctx.stored = [_to_host(a, pin) if isinstance(a, torch.Tensor) else a for a in args]
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        # the recomputation runs in backward, where autocast may be set otherwise: it repeats this one
        device_type = next((d.type for d in ctx.devices if d is not None), "cpu")
        ctx.autocast = dict(
            device_type=device_type,
            enabled=torch.is_autocast_enabled(device_type),
            dtype=torch.get_autocast_dtype(device_type),
        )
        with torch.no_grad():
            return function(*args)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        args = []
        for stored, device, needs in zip(ctx.stored, ctx.devices, ctx.needs_grad, strict=True):
            if device is None:
                args.append(stored)
            else:
                args.append(stored.to(device, non_blocking=True).detach().requires_grad_(needs))
        devices = list(range(torch.cuda.device_count())) if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), torch.autocast(**ctx.autocast):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state_all(ctx.cuda_rng)
            output = ctx.function(*args)
        torch.autograd.backward(output, grad_output)
        grads = [a.grad if needs else None for a, needs in zip(args, ctx.needs_grad, strict=True)]
        return (None, None, *grads)


def _to_host(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    host = tensor.detach().to("cpu", copy=True)
    return host.pin_memory() if pin else host


def checkpoint_with_offload(function: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``function(*args)`` checkpointed, its tensor inputs held in CPU memory until backward."""
    anchor = torch.empty(0, requires_grad=True)  # keeps the node in the graph when no input needs a gradient
    return _OffloadedCheckpoint.apply(function, anchor, *args)
