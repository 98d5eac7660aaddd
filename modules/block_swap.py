"""Block swap: keep some of a model's blocks in host memory, on the compute device only while they run.

Each swapped block keeps a permanent host copy of its tensors (pinned on CUDA). Bringing it in
points its tensors at a device copy; sending it out points them back at the host copy; nothing is
ever copied back, since swapped weights are frozen (LoRA weights live outside the blocks).

Forward: a swapped block is brought in just before it runs and sent out right after. Backward
(training): an identity autograd node on the block's output brings the block back before its
gradient is computed (also for gradient-checkpointing recomputation) and sends the block that ran
before it back out; backward walks the blocks in reverse, so at most one swapped block is on the
device at a time. With CPU as both places the same bookkeeping runs, which is how it is tested.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class BlockSwap:
    def __init__(
        self,
        blocks: Sequence[nn.Module],
        swapped: Sequence[int],
        device: torch.device | str,
        host: torch.device | str = "cpu",
    ):
        self.blocks, self.swapped = list(blocks), set(swapped)
        self.device, self.host = torch.device(device), torch.device(host)
        self.log: list[tuple[str, int]] = []
        self._on_device: set[int] = set()
        self._host_copies: dict[int, list[torch.Tensor]] = {}
        pin = self.device.type == "cuda"
        for index, block in enumerate(self.blocks):
            tensors = _tensors(block)
            if index in self.swapped:
                copies = [t.data.to(self.host) for t in tensors]
                self._host_copies[index] = [c.pin_memory() if pin else c for c in copies]
                for tensor, copy in zip(tensors, self._host_copies[index], strict=True):
                    tensor.data = copy
            else:
                for tensor in tensors:
                    tensor.data = tensor.data.to(self.device)

    def bring_in(self, index: int) -> None:
        if index not in self.swapped or index in self._on_device:
            return
        for tensor, copy in zip(_tensors(self.blocks[index]), self._host_copies[index], strict=True):
            tensor.data = copy.to(self.device, non_blocking=True)
        self._on_device.add(index)
        self.log.append(("in", index))

    def send_out(self, index: int) -> None:
        if index not in self._on_device:
            return
        for tensor, copy in zip(_tensors(self.blocks[index]), self._host_copies[index], strict=True):
            tensor.data = copy
        self._on_device.discard(index)
        self.log.append(("out", index))

    def send_out_all_but(self, keep: int | None = None) -> None:
        for index in sorted(self._on_device - {keep}):
            self.send_out(index)

    def run(self, index: int, function: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        """``function(*args)`` (block ``index``'s forward) with that block on the device."""
        if index not in self.swapped:
            return function(*args)
        self.send_out_all_but(index)  # e.g. the block the last backward ended with
        self.bring_in(index)
        out = function(*args)
        self.send_out(index)
        if out.requires_grad:
            out = _BringBackForBackward.apply(out, self, index)
        return out


class _BringBackForBackward(torch.autograd.Function):
    """Identity; in backward, puts block ``index`` back on the device before its gradient is computed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, swap: BlockSwap, index: int) -> torch.Tensor:
        ctx.swap, ctx.index = swap, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.swap.send_out_all_but(ctx.index)
        ctx.swap.bring_in(ctx.index)
        return grad, None, None


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


def swap_plan(num_blocks: int, requested: int) -> tuple[list[int], int]:
    """Which blocks to swap (the last ``requested`` in execution order) and how many that is after
    clamping to the number of blocks."""
    count = max(0, min(requested, num_blocks))
    return list(range(num_blocks - count, num_blocks)), count
