"""Sequence parallelism for the DiT's visual tokens (Ulysses: all-to-all over attention heads).

Each of P processes holds 1/P of the visual tokens through every visual block. Modulation, cross-
attention (the text is whole on every process) and the feed-forward are per token and need no
exchange. Visual self-attention does: after the q/k/v projections, q/k normalisation and the rotary
rotation (each process rotates its own tokens by their own positions), an all-to-all gives every
process the whole sequence for H/P of the heads; attention (dense, or NABLA, whose block mask is
computed per head) runs there, and a second all-to-all returns each process its tokens with all
heads. The text blocks run whole on every process. The input is split as patches, before the input
projection, and the output layer (per token too) runs on each share, so only the output patches
(pt*ph*pw*16 = 64 values a token) are gathered: nothing of model width exists whole on a process.
Needs H and the token count divisible by P.

This module imports torch.distributed only when a split runs, so the scripts' option checks use it
before their heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class SequenceSplitError(ValueError):
    pass


@dataclass(frozen=True)
class SequenceSplit:
    """This process's place in the split: ``size`` processes of ``group`` (None: the default group)."""

    rank: int
    size: int
    group: object = None

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This process's share of ``x`` along ``dim`` (the token dimension)."""
        return x.chunk(self.size, dim=dim)[self.rank]


def attention_heads(dit_params) -> int:
    """The visual self-attention's head count of a DiT built from ``dit_params`` (a task's preset)."""
    return dit_params["model_dim"] // sum(dit_params["axes_dims"])


def check_split(size: int, heads: int, tokens: dict[str, int] | None = None) -> None:
    """Refuse a split the scheme cannot make: ``heads`` that do not divide by ``size``, or a token count
    that does not; ``tokens`` maps what each count belongs to (a job, a bucket, a step) to its count."""
    if heads % size:
        raise SequenceSplitError(
            f"--sequence_parallel {size}: the DiT has {heads} attention heads, which do not split over {size} "
            f"processes (use a divisor of {heads})"
        )
    for name, count in (tokens or {}).items():
        if count % size:
            raise SequenceSplitError(
                f"--sequence_parallel {size}: {name} has {count} visual tokens, which do not split over {size} "
                f"processes (pick a size or frame count that gives a multiple of {size}, or another split)"
            )


def process_count_error(size: int, processes: int, script: str, groups_allowed: bool) -> str | None:
    """The message for a split that does not fit the processes launched (None when it fits). Training
    may run several groups of ``size`` processes (each group one data-parallel share); generation one."""
    if processes % size == 0 and (groups_allowed or processes == size):
        return None
    need = f"a multiple of {size}" if groups_allowed else str(size)
    return (
        f"--sequence_parallel {size} needs {need} processes; this run has {processes}. Launch it with "
        f"accelerate launch --num_processes {size} {script} ... (see docs/runs.md)"
    )


def join_sequence_groups(size: int) -> SequenceSplit:
    """With the default process group up: groups of ``size`` consecutive ranks, and this process's place
    in its group (every process must call this, in the same order)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if size == world:
        return SequenceSplit(rank, size)
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return SequenceSplit(rank % size, size, mine)


def _group(split: SequenceSplit):
    import torch.distributed as dist

    return split.group or dist.group.WORLD


def _all_to_all(x: torch.Tensor, split: SequenceSplit) -> torch.Tensor:
    """x (P, ...): piece p goes to process p; returns (P, ...) with the piece each process sent here."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    flat = x.contiguous().view(split.size, -1)
    return wait_tensor(all_to_all_single_autograd(flat, None, None, _group(split))).view(x.shape)


def tokens_to_heads(x: torch.Tensor, split: SequenceSplit) -> torch.Tensor:
    """(B, S/P, H, D) of this process's tokens -> (B, S, H/P, D): every token, this process's heads."""
    b, s, h, d = x.shape
    pieces = x.reshape(b, s, split.size, h // split.size, d).permute(2, 0, 1, 3, 4)
    return _all_to_all(pieces, split).permute(1, 0, 2, 3, 4).reshape(b, split.size * s, h // split.size, d)


def heads_to_tokens(x: torch.Tensor, split: SequenceSplit) -> torch.Tensor:
    """(B, S, H/P, D) -> (B, S/P, H, D): this process's tokens with every head (the inverse of the above)."""
    b, tokens, hp, d = x.shape
    s = tokens // split.size
    pieces = x.reshape(b, split.size, s, hp, d).permute(1, 0, 2, 3, 4)
    return _all_to_all(pieces, split).permute(1, 2, 0, 3, 4).reshape(b, s, split.size * hp, d)


def gather_tokens(x: torch.Tensor, split: SequenceSplit) -> torch.Tensor:
    """(B, S/P, C) of every process -> (B, S, C), in process order. Its backward sums the gradients of
    every process (each computes the same loss from the gathered output), see kandinsky5/training."""
    from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor

    # waited here: an output nobody reads would otherwise leave the exchange pending at exit
    return wait_tensor(all_gather_single_autograd(x.contiguous(), 1, _group(split)))
