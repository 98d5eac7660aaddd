"""Sequence parallelism for the DiT's visual tokens (Ulysses: all-to-all over attention heads).

Each of P processes holds 1/P of the visual tokens through every visual block. Modulation, cross-
attention (the text is whole on every process) and the feed-forward are per token and need no
exchange. Visual self-attention does: after the q/k/v projections, q/k normalisation and the rotary
rotation (each process rotates its own tokens by their own positions), an all-to-all gives every
process the whole sequence for H/P of the heads; attention (dense, or NABLA, whose block mask is
computed per head) runs there, and a second all-to-all returns each process its tokens with all
heads. The text blocks run whole on every process. The output is gathered whole before the output
layer. Needs H and the token count divisible by P.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class SequenceSplitError(ValueError):
    pass


@dataclass(frozen=True)
class SequenceSplit:
    """This process's place in the split: ``size`` processes of ``group`` (None: the default group)."""

    rank: int
    size: int
    group: object = None

    def check(self, heads: int, tokens: int | None = None) -> None:
        if heads % self.size:
            raise SequenceSplitError(
                f"--sequence_parallel {self.size}: the DiT has {heads} attention heads, which do not split over "
                f"{self.size} processes (use a divisor of {heads})"
            )
        if tokens is not None and tokens % self.size:
            raise SequenceSplitError(
                f"--sequence_parallel {self.size}: {tokens} visual tokens do not split over {self.size} processes "
                "(change the frame count or size)"
            )

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This process's share of ``x`` along ``dim`` (the token dimension)."""
        return x.chunk(self.size, dim=dim)[self.rank]


def _all_to_all(x: torch.Tensor, split: SequenceSplit) -> torch.Tensor:
    """x (P, ...): piece p goes to process p; returns (P, ...) with the piece each process sent here."""
    from torch.distributed.nn.functional import all_to_all_single  # differentiable

    flat = x.contiguous().view(split.size, -1)
    out = all_to_all_single(torch.empty_like(flat), flat, group=split.group or dist.group.WORLD)
    return out.view(x.shape)


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
    """(B, S/P, C) of every process -> (B, S, C), in process order."""
    from torch.distributed.nn.functional import all_gather  # differentiable

    return torch.cat(all_gather(x.contiguous(), group=split.group or dist.group.WORLD), dim=1)
