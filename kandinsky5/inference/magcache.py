"""MagCache: skip the visual transformer blocks on sampling steps whose result is predictable.

Over most of a sampling run, the change the visual blocks make to their input (the residual
``blocks(x) - x``) shrinks or grows by a nearly fixed ratio from one step to the next. The official
configs list that magnitude ratio per step and per guidance pass (cond, uncond) for each SFT
model. MagCache multiplies the ratios of the steps since the blocks last ran; while the sum of the
deviations ``|1 - product|`` stays under a threshold (and at most ``max_skips`` steps in a row),
it reuses the last residual instead of running the blocks. The first ``retention`` fraction of
the run always computes, because the early steps set the composition.

Embeddings, the text blocks and the output layer always run; only the visual blocks are skipped.
With guidance, the conditional and unconditional passes keep separate state (as the official
implementation does), also when both run in one batched forward: if only one of them may skip,
the blocks run on the other half of the batch alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

RATIOS_FILE = Path(__file__).parent / "data" / "magcache_ratios.json"
DEFAULT_THRESHOLD = 0.12
DEFAULT_MAX_SKIPS = 2
DEFAULT_RETENTION = 0.2

# The tiny test presets borrow the list of the model they are shaped like.
_BORROWED = {
    "tiny-t2v": "k5-lite-t2v-5s-sd",
    "tiny-i2v": "k5-lite-i2v-5s-sd",
    "tiny-pro-t2v": "k5-pro-t2v-5s-sd",
    "tiny-t2v-nabla": "k5-lite-t2v-10s-sd",
    "tiny-t2i": "k5-lite-t2i-hd",
}

RunBlocks = Callable[[slice], torch.Tensor]


@cache
def _ratio_table() -> dict[str, list[float]]:
    return json.loads(RATIOS_FILE.read_text())


def task_ratios(task_name: str) -> list[float]:
    """The task's magnitude ratios, cond and uncond interleaved, one pair per step of the official
    50-step run (the first pair is 1: the official lists start at the second step)."""
    table = _ratio_table()
    key = _BORROWED.get(task_name, task_name)
    if key not in table:
        raise ValueError(
            f"--magcache: the task {task_name!r} has no MagCache ratios (the official configs give them for "
            f"{', '.join(sorted(table))}; distilled, pretrain and I2I models have none)"
        )
    return [1.0, 1.0, *table[key]]


def ratios_for_steps(ratios: list[float], steps: int) -> tuple[list[float], list[float]]:
    """(cond, uncond) ratio per step for a run of ``steps`` steps: the official nearest-index
    resampling of each interleaved half when the list was measured for another step count."""
    if steps < 1:
        raise ValueError(f"MagCache needs at least one sampling step, got {steps}")
    cond, uncond = ratios[0::2], ratios[1::2]
    if len(cond) == steps:
        return cond, uncond
    if steps == 1:
        return cond[:1], uncond[:1]
    index = torch.round(torch.arange(steps, dtype=torch.float64) * (len(cond) - 1) / (steps - 1)).long().tolist()
    return [cond[i] for i in index], [uncond[i] for i in index]


@dataclass
class _Stream:
    """Accumulated state of one guidance pass (0 = cond, 1 = uncond)."""

    ratio: float = 1.0
    steps: int = 0
    error: float = 0.0
    residual: torch.Tensor | None = None

    def reset(self) -> None:
        self.ratio, self.steps, self.error = 1.0, 0, 0.0


class MagCache:
    """The skip decisions and cached residuals of one sampling run (make a new one per run)."""

    def __init__(
        self,
        ratios: list[float],
        steps: int,
        num_blocks: int,
        threshold: float = DEFAULT_THRESHOLD,
        max_skips: int = DEFAULT_MAX_SKIPS,
        retention: float = DEFAULT_RETENTION,
    ):
        if threshold < 0 or max_skips < 0 or not 0.0 <= retention <= 1.0:
            raise ValueError(
                f"MagCache settings out of range: threshold {threshold} (>= 0), max skips {max_skips} (>= 0), "
                f"retention ratio {retention} (0 to 1)"
            )
        self.step_ratios = ratios_for_steps(ratios, steps)
        self.threshold, self.max_skips = threshold, max_skips
        self.first_skippable_pass = int(2 * steps * retention)  # in the official count of 2 passes per step
        self.num_blocks = num_blocks
        self.streams = (_Stream(), _Stream())
        self.step = -1
        self.passes = 0
        self.skipped_passes = 0

    def next_step(self) -> None:
        self.step += 1

    def _may_skip(self, stream: int) -> bool:
        state = self.streams[stream]
        if 2 * self.step + stream < self.first_skippable_pass or state.residual is None:
            return False
        state.ratio *= self.step_ratios[stream][self.step]
        state.steps += 1
        state.error += abs(1.0 - state.ratio)
        if state.error < self.threshold and state.steps <= self.max_skips:
            return True
        state.reset()
        return False

    def hook(self, streams: list[tuple[int, slice]]) -> Callable[[torch.Tensor, RunBlocks], torch.Tensor]:
        """What the DiT calls in place of its visual blocks for the current step. ``streams`` names
        the guidance pass of each slice of the batch, in batch order."""

        def visual_blocks(visual: torch.Tensor, run_blocks: RunBlocks) -> torch.Tensor:
            skip = [self._may_skip(stream) for stream, _ in streams]
            self.passes += len(streams)
            self.skipped_passes += sum(skip)
            if not any(skip):  # one pass over the whole batch
                out = run_blocks(slice(None))
                parts = [out[rows] for _, rows in streams]
            else:
                parts = [
                    visual[rows] + self.streams[stream].residual if skipped else run_blocks(rows)
                    for (stream, rows), skipped in zip(streams, skip, strict=True)
                ]
            for (stream, rows), part, skipped in zip(streams, parts, skip, strict=True):
                if not skipped:
                    self.streams[stream].residual = part - visual[rows]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        return visual_blocks

    def summary(self) -> str:
        blocks = self.skipped_passes * self.num_blocks
        return (
            f"MagCache skipped the visual blocks on {self.skipped_passes} of {self.passes} model passes "
            f"({blocks} of {self.passes * self.num_blocks} block passes)"
        )


def magcache_for(options, task_name: str, steps: int, num_blocks: int) -> MagCache | None:
    """A fresh MagCache for one sampling run of ``steps`` steps, or None without ``--magcache``."""
    if not getattr(options, "magcache", False):
        return None
    return MagCache(
        task_ratios(task_name),
        steps,
        num_blocks,
        threshold=options.magcache_threshold,
        max_skips=options.magcache_max_skips,
        retention=options.magcache_retention,
    )
