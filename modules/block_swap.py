"""Block swap: keep some of a model's blocks in host memory, on the compute device only while they run.

Each swapped block keeps a permanent host copy of its tensors (pinned on CUDA). Bringing it in
points its tensors at a device copy; sending it out points them back at the host copy; nothing is
ever copied back, since swapped weights are frozen (LoRA weights live outside the blocks).

Forward: a swapped block is brought in just before it runs and sent out right after; while it
runs, the next swapped block is already being copied in (on CUDA on a side stream, so the copy
overlaps the computation; the compute stream waits for that copy only when the block is needed).
Backward (training): an identity autograd node on the block's output brings the block back before
its gradient is computed (also for gradient-checkpointing recomputation), sends the block that ran
before it back out, and starts copying the block whose gradient comes next; backward walks the
blocks in reverse. At most two swapped blocks are on the device at a time. With CPU as both places
the same schedule and bookkeeping run (without streams), which is how it is tested.
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
        self._copied: dict[int, torch.cuda.Event] = {}  # CUDA copies in flight on the side stream
        pin = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if pin else None
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

    def prefetch(self, index: int) -> None:
        """Start copying block ``index`` to the device (on CUDA on the side stream; elsewhere at once)."""
        if index not in self.swapped or index in self._on_device:
            return
        tensors, copies = _tensors(self.blocks[index]), self._host_copies[index]
        if self._stream is None:
            for tensor, copy in zip(tensors, copies, strict=True):
                tensor.data = copy.to(self.device)
        else:
            compute = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(compute)  # the memory it reuses may still be read by queued kernels
            with torch.cuda.stream(self._stream):
                for tensor, copy in zip(tensors, copies, strict=True):
                    tensor.data = copy.to(self.device, non_blocking=True)
                    tensor.data.record_stream(compute)  # freed only after the compute stream is done with it
                self._copied[index] = torch.cuda.Event()
                self._copied[index].record(self._stream)
        self._on_device.add(index)
        self.log.append(("in", index))

    def bring_in(self, index: int) -> None:
        """Block ``index`` usable by the next kernels of the compute stream."""
        if index not in self.swapped:
            return
        self.prefetch(index)
        event = self._copied.pop(index, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def send_out(self, index: int) -> None:
        if index not in self._on_device:
            return
        self._copied.pop(index, None)
        for tensor, copy in zip(_tensors(self.blocks[index]), self._host_copies[index], strict=True):
            tensor.data = copy
        self._on_device.discard(index)
        self.log.append(("out", index))

    def send_out_all_but(self, *keep: int) -> None:
        for index in sorted(self._on_device - set(keep)):
            self.send_out(index)

    def run(self, index: int, function: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        """``function(*args)`` (block ``index``'s forward) with that block on the device; the block
        that runs next (the following one, or the previous one in a recomputation during backward)
        is copied in meanwhile."""
        if index not in self.swapped:
            if not _in_backward():
                self.prefetch(index + 1)  # the first swapped block, while the last resident one runs
            return function(*args)
        following = index - 1 if _in_backward() else index + 1
        self.send_out_all_but(index, following)  # e.g. the block the last backward ended with
        self.bring_in(index)
        self.prefetch(following)
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
        swap, index = ctx.swap, ctx.index
        swap.send_out_all_but(index, index - 1)
        swap.bring_in(index)
        swap.prefetch(index - 1)  # backward goes on with the block before
        return grad, None, None


def _in_backward() -> bool:
    """Whether autograd is running a backward pass in this thread (gradient-checkpointing recomputation)."""
    return torch._C._current_graph_task_id() != -1


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


def swap_plan(num_blocks: int, requested: int) -> tuple[list[int], int]:
    """Which blocks to swap (the last ``requested`` in execution order) and how many that is after
    clamping to the number of blocks."""
    count = max(0, min(requested, num_blocks))
    return list(range(num_blocks - count, num_blocks)), count
