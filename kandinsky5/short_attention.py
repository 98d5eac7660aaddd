"""Attention for short sequences on the CPU: two matmuls around an fp32 softmax.

For the few hundred tokens of a small video or image, PyTorch's CPU SDPA kernel spends more time
on its tiling than on the arithmetic: plain matmuls are about 1.5x faster forward and 2x faster
forward and backward. The backward is written out here (as FlashAttention's) so that it keeps
only what SDPA keeps, q, k, v, the output and the row log-sum-exp, and recomputes the scores,
instead of autograd holding fp32 copies of q and k and two copies of the probabilities.
"""

from __future__ import annotations

import torch

from modules.wide_matmul import matmul


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or in its own dtype when that is wider."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _scores(q32: torch.Tensor, k32: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H, L, S) fp32 scores of (B, H, L, D) queries and (B, H, S, D) keys, both already wide;
    masked keys at -inf."""
    scores = torch.matmul(q32, k32.transpose(-1, -2)).mul_(q32.shape[-1] ** -0.5)
    if key_mask is not None:
        scores.masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    return scores


def _softmax_and_lse(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax of ``scores`` over keys, computed in place, and the row log-sum-exp (kept for the
    backward): one pass for the maximum, one for exp, one for the sum, one to divide."""
    peak = scores.amax(dim=-1, keepdim=True)
    probs = scores.sub_(peak).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    return probs.div_(total), total.log_().add_(peak)


class _ShortAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask):
        probs, lse = _softmax_and_lse(_scores(_wide(q), _wide(k), key_mask))
        out = matmul(probs.to(v.dtype), v)
        ctx.save_for_backward(q, k, v, out, lse, key_mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]  # cross-attention's keys and values often need none
        grad_q = grad_k = grad_v = None
        q32, k32 = _wide(q), _wide(k)  # each widened once, for the scores and for the other's gradient
        probs = _scores(q32, k32, key_mask).sub_(lse).exp_()
        if need_v:
            grad_v = matmul(probs.to(v.dtype).transpose(-1, -2), grad_out)
        if need_q or need_k:
            grad_out32 = _wide(grad_out)
            grad_probs = torch.matmul(grad_out32, _wide(v).transpose(-1, -2))
            row = torch.mul(grad_out32, out).sum(dim=-1, keepdim=True)  # out widened as it is read
            grad_scores = probs.mul_(grad_probs.sub_(row)).mul_(q.shape[-1] ** -0.5)
            if need_q:
                grad_q = torch.matmul(grad_scores, k32).to(q.dtype)
            if need_k:
                grad_k = torch.matmul(grad_scores.transpose(-1, -2), q32).to(k.dtype)
        return grad_q, grad_k, grad_v, None


def short_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, H, L, D) tensors: scores and softmax in fp32, the value
    product in v's dtype. ``key_mask`` (B, S): True for the keys to attend to."""
    return _ShortAttention.apply(q, k, v, key_mask)
