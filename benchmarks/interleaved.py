"""A DiT's time and its roofline's, measured block by block in one run.

On a shared machine the speed of the cores can change by a third within seconds, so a roofline
timed before or after a whole forward (seconds long) may meet a faster or slower machine than the
forward did. Here the roofline's share of each transformer block (benchmarks/roofline.py, its
parts) runs right after that block: after each block's forward its forward matmuls, after each
block's backward (when the gradient of the block's input is complete) its backward matmuls, and
after each call of the model the matmuls outside the blocks. Both sides then meet the same machine
within a fraction of a second. The model's time is the run's wall time less the time spent in these
hooks; the roofline's is the sum of its shares. (On a GPU each hook first waits for the model's
queued work, so the model loses the overlap of one block's launches with the last one's kernels.)

The hooks need only the blocks' lists ``text_transformer_blocks`` and ``visual_transformer_blocks``
(ours and diffusers' Kandinsky5Transformer3DModel both have them) and the hidden states as each
block's first argument and the latents as the model's.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import torch
from roofline import roofline_pass

Parts = Callable[[int], dict[str, Counter]]  # batch -> the shapes of each part ("text block", ...)


class Interleaved:
    """Times ``run`` (one unit of work on ``model``) with the roofline's share of each block run right
    after it. ``forward_parts`` / ``backward_parts`` give the shapes for a batch size; the shares are
    built on first use (outside the timed time) and kept."""

    def __init__(self, model: torch.nn.Module, forward_parts: Parts, backward_parts: Parts, device: str, sync):
        self.model, self.device, self.sync = model, device, sync
        self.parts = {"forward": forward_parts, "backward": backward_parts}
        self._shares: dict[tuple[str, str, int], Callable[[], None]] = {}
        self._hook_seconds = self._roof_seconds = 0.0
        self._handles: list = []
        self.shares_run: Counter = Counter()  # (direction, part, batch) -> times run in the last measure

    def measure(self, run: Callable[[], object]) -> tuple[float, float]:
        """(the model's seconds, the roofline's seconds) of one ``run``."""
        self._handles = [self.model.register_forward_hook(self._after("outside the blocks"))]
        for part, blocks in (
            ("text block", self.model.text_transformer_blocks),
            ("visual block", self.model.visual_transformer_blocks),
        ):
            self._handles += [block.register_forward_hook(self._after(part)) for block in blocks]
        self._hook_seconds = self._roof_seconds = 0.0
        self.shares_run.clear()
        try:
            self.sync()
            start = time.perf_counter()
            run()
            self.sync()
            wall = time.perf_counter() - start
        finally:  # a leaf input (the latents of every run) would keep its gradient hook
            for handle in self._handles:
                handle.remove()
        return wall - self._hook_seconds, self._roof_seconds

    def _share(self, direction: str, part: str, batch: int) -> Callable[[], None]:
        key = (direction, part, batch)
        if key not in self._shares:
            self._shares[key] = roofline_pass(self.parts[direction](batch)[part], torch.bfloat16, self.device)
        return self._shares[key]

    def _run_share(self, direction: str, part: str, batch: int) -> None:
        """Run one share of the roofline inside a hook; all of the hook's time is taken off the model's."""
        self.sync()  # the model's queued work (on a GPU) is the model's time
        entered = time.perf_counter()
        share = self._share(direction, part, batch)
        with torch.no_grad():
            start = time.perf_counter()
            share()
            self.sync()
            done = time.perf_counter()
        self._roof_seconds += done - start
        self._hook_seconds += done - entered
        self.shares_run[direction, part, batch] += 1

    def _on_backward(self, hidden: torch.Tensor, part: str, batch: int) -> None:
        """Run the backward share once the gradient of ``hidden`` (a block's or the model's input) is complete."""
        if torch.is_grad_enabled() and hidden.requires_grad:
            self._handles.append(hidden.register_hook(lambda grad: self._run_share("backward", part, batch)))

    def _after(self, part: str):
        """A forward hook for a block (or the model) of ``part``: its first argument is the hidden state."""

        def hook(module, args, output):
            batch = args[0].shape[0]
            self._run_share("forward", part, batch)
            self._on_backward(args[0], part, batch)

        return hook
