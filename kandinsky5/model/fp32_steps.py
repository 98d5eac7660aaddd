"""The fp32 steps between a block's matmuls, each one autograd node with its backward written out.

Each step reads a bf16 (compute-dtype) tensor, works in fp32 and rounds its result back, as the
official model does. Left to autograd, every one of them becomes a chain of nodes: the widening
copy, the norm's parts, the rotation, the rounding, each keeping its own fp32 inputs for the
backward and each doing a pass over the activations there. Written as one node apiece:

- the forward computes exactly what the chain computes (the same operations in the same order, so
  the same bits: tests compare them);
- the backward keeps only the compute-dtype input and the per-row statistics (half the memory of
  the fp32 copies autograd keeps), recomputes the normalized values from them, and gives the
  gradients of the chain up to the order of the sums;
- a residual sum passes its output gradient on to the residual stream unchanged, as it is.

Gradients of the small fp32 operands (norm weights, modulation shift, scale and gate) are computed
only where they are wanted: a LoRA on the modulation layers, or a full fine-tune.
"""

from __future__ import annotations

import torch


def _fp32_copy(x: torch.Tensor) -> torch.Tensor:
    """A new contiguous fp32 tensor holding ``x`` (never ``x`` itself, which the caller may then
    change in place)."""
    return torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """The channel pairs (2j, 2j+1) of a contiguous fp32 ``x`` as complex numbers, sharing its memory."""
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


def _reduce_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the dimensions that ``like`` broadcasts, in ``like``'s shape and dtype."""
    return t.sum_to_size(like.shape).to(like.dtype)


def _tracked(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an operation on ``tensors`` (else a step runs its forward alone)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _norm_rotate(x, weight, eps, rope, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The rounded result and the per-row 1 / rms."""
    y = _fp32_copy(x)
    rstd = y.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
    y.mul_(rstd)
    if weight is not None:
        y.mul_(weight)
    if rope is not None:  # (x0 + i x1)(cos + i sin): the four products and two sums in one pass
        _pairs(y).mul_(rope)
    return y.to(dtype), rstd


class _NormRotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, rope, dtype):
        out, rstd = _norm_rotate(x, weight, eps, rope, dtype)
        ctx.save_for_backward(x, rstd, weight, rope)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight, rope = ctx.saved_tensors
        grad = _fp32_copy(grad)
        if rope is not None:  # a rotation's transpose is the rotation by the opposite angles
            _pairs(grad).mul_(rope.conj())
        normed = _fp32_copy(x).mul_(rstd)
        grad_weight = None
        if weight is not None:
            if ctx.needs_input_grad[1]:
                grad_weight = _reduce_to(grad * normed, weight)
            grad.mul_(weight)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed))
            projection = (grad * normed).mean(-1, keepdim=True)
            grad_x = grad.sub_(normed.mul_(projection)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None, None, None


def rms_norm_rotate(
    norm: torch.nn.RMSNorm, x: torch.Tensor, rope: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``norm`` (RMSNorm over the last dimension) of ``x`` in fp32, then, if ``rope`` is given, the
    rotation of its channel pairs (2j, 2j+1) by ``rope``'s complex factors (kandinsky5/model/rope.py),
    rounded to ``dtype``."""
    eps = torch.finfo(torch.float32).eps if norm.eps is None else norm.eps
    weight = None if norm.weight is None else norm.weight.float()
    if _tracked(x, weight):
        return _NormRotate.apply(x, weight, eps, rope, dtype)
    return _norm_rotate(x, weight, eps, rope, dtype)[0]


def _modulate(x, shift, scale, eps) -> tuple[torch.Tensor, ...]:
    """The rounded result, the per-row mean and 1 / standard deviation, and 1 + scale."""
    normed, mean, rstd = torch.native_layer_norm(x.float(), x.shape[-1:], None, None, eps)
    factor = 1.0 + scale
    return torch.addcmul(shift, normed, factor).to(x.dtype), mean, rstd, factor


class _Modulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        out, mean, rstd, factor = _modulate(x, shift, scale, eps)
        ctx.save_for_backward(x, mean, rstd, shift, scale, factor)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, shift, scale, factor = ctx.saved_tensors
        need_x, need_shift, need_scale = ctx.needs_input_grad[:3]
        grad_x = grad_shift = grad_scale = None
        x32 = x.float()
        if need_x:
            grad_normed = torch.mul(grad, factor)  # fp32: the factor promotes the product
            mask = [True, False, False]
            grad_x = torch.ops.aten.native_layer_norm_backward(
                grad_normed, x32, x.shape[-1:], mean, rstd, None, None, mask
            )[0].to(x.dtype)
        if need_shift:
            grad_shift = _reduce_to(grad.float(), shift)
        if need_scale:
            normed = (x32 - mean).mul_(rstd)
            grad_scale = _reduce_to(normed.mul_(grad), scale)
        return grad_x, grad_shift, grad_scale, None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm of ``x`` (no affine, fp32) times 1 + ``scale`` plus ``shift`` (fp32, broadcast over
    the tokens), rounded to x's dtype."""
    if _tracked(x, shift, scale):
        return _Modulate.apply(x, shift, scale, eps)
    return _modulate(x, shift, scale, eps)[0]


class _GatedAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, update):
        ctx.save_for_backward(gate, update if ctx.needs_input_grad[1] else None)
        ctx.update_dtype = update.dtype
        return torch.addcmul(x, gate, update).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        gate, update = ctx.saved_tensors
        need_x, need_gate, need_update = ctx.needs_input_grad
        # the sum's gradient reaches x unchanged: widened, then rounded back to x's dtype, it is itself
        grad_x = grad if need_x else None
        grad_gate = _reduce_to(grad.float() * update, gate) if need_gate else None
        grad_update = torch.mul(grad, gate).to(ctx.update_dtype) if need_update else None
        return grad_x, grad_gate, grad_update


def gated_add(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """x + gate * update in fp32 (the fp32 gate promotes the sum; x and update are widened as they are
    read, not copied), returned in x's dtype."""
    gate = gate.float()
    if _tracked(x, gate, update):
        return _GatedAdd.apply(x, gate, update)
    return torch.addcmul(x, gate, update).to(x.dtype)
