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


def _scores(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H, L, S) fp32 scores of (B, H, L, D) queries and (B, H, S, D) keys; masked keys at -inf."""
    scores = torch.matmul(_wide(q), _wide(k).transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
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
        probs, lse = _softmax_and_lse(_scores(q, k, key_mask))
        out = matmul(probs.to(v.dtype), v)
        ctx.save_for_backward(q, k, v, out, lse, key_mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]  # cross-attention's keys and values often need none
        grad_q = grad_k = grad_v = None
        probs = _scores(q, k, key_mask).sub_(lse).exp_()
        if need_v:
            grad_v = matmul(probs.to(v.dtype).transpose(-1, -2), grad_out)
        if need_q or need_k:
            grad_out_wide = _wide(grad_out)
            grad_probs = torch.matmul(grad_out_wide, _wide(v).transpose(-1, -2))
            row = (grad_out_wide * _wide(out)).sum(dim=-1, keepdim=True)
            grad_scores = probs.mul_(grad_probs.sub_(row)).mul_(q.shape[-1] ** -0.5)
            if need_q:
                grad_q = torch.matmul(grad_scores, _wide(k)).to(q.dtype)
            if need_k:
                grad_k = torch.matmul(grad_scores.transpose(-1, -2), _wide(q)).to(k.dtype)
        return grad_q, grad_k, grad_v, None


def short_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, H, L, D) tensors: scores and softmax in fp32, the value
    product in v's dtype. ``key_mask`` (B, S): True for the keys to attend to."""
    return _ShortAttention.apply(q, k, v, key_mask)
