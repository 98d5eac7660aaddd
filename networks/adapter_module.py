"""What every trainable adapter of a Linear layer shares (LoRA, LoHa, LoKr): its name, alpha, dropouts,
the weight-decomposed (DoRA) form, and the fp32 product that keeps a bf16 input as it is.

An adapter adds ``update(x)`` to the layer's output; ``delta_weight()`` is the same change as a full
(out, in) fp32 matrix, which ComfyUI and generation add to the weight.

DoRA (``dora_wd=True``): the adapted weight is rescaled column by column (per input feature), as
LyCORIS trains it and ComfyUI merges it: W' = (W + dW) * dora_scale / ||W + dW||, the norm taken
over the output axis, ``dora_scale`` (1, in) starting at the base weight's own column norms. Since a
column scale of the weight is a scale of the input, the forward is the layer and the update applied
to ``x * dora_scale / norm``. The norm is held constant in the backward, as the DoRA paper (section
4.3) and PEFT do: no (out, in) matrix is kept per layer for the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.fp8 import FP8Linear, dequantize_weight


class _WideLinear(torch.autograd.Function):
    """F.linear(x.to(weight.dtype), weight) that keeps ``x`` in its own dtype for the backward and
    widens it again there. The fp32 copy autograd would keep is twice the size of a bf16 input, and
    one is kept per layer, where the q, k and v adapters of an attention share one input."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return grad_x, grad_weight


def wide_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` times ``weight``ᵀ in the dtype of ``weight`` (normally fp32 over a bf16 input). It runs
    inside the DiT, where autocast is off."""
    if x.dtype == weight.dtype:
        return F.linear(x, weight)
    return _WideLinear.apply(x, weight)


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen layer's weight in fp32 (an fp8 weight dequantized)."""
    if isinstance(layer, FP8Linear):
        return dequantize_weight(layer.weight, layer.scale_weight, torch.float32)
    return layer.weight.float()


class AdapterModule(nn.Module):
    """The trainable change of one Linear layer; subclasses give ``update``, ``delta_weight`` and
    ``scale_update``, and name their tensors as the files do."""

    kind = "adapter"

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float | None,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        dora: bool = False,
    ):
        super().__init__()
        self.name, self.rank = name, rank
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("alpha", torch.tensor(float(alpha or rank)))
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.base_forward = base.forward  # the layer's own forward, kept before the adapter replaces it
        if dora:
            self.dora_scale = nn.Parameter(base_weight(base).norm(dim=0, keepdim=True))
        else:
            self.dora_scale = None

    @property
    def base_layer(self) -> nn.Module:
        return self.base_forward.__self__

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def update(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def scale_update(self, ratio: float) -> None:
        """Multiply the update by ``ratio`` (max-norm regularization)."""
        raise NotImplementedError

    def output_dropout(self, update: torch.Tensor) -> torch.Tensor:
        """``dropout`` on the update, and ``rank_dropout`` as whole output features dropped for the
        batch (the update rescaled to keep its mean): the LoHa and LoKr meaning of both."""
        if self.training and self.dropout:
            update = F.dropout(update, p=self.dropout)
        if self.training and self.rank_dropout:
            keep = torch.rand(update.shape[-1], device=update.device) > self.rank_dropout
            update = update * (keep.to(update.dtype) / (1.0 - self.rank_dropout))
        return update

    def dora_factor(self, dtype: torch.dtype) -> torch.Tensor:
        """dora_scale / ||W + dW|| per input feature, the norm held constant for the backward."""
        with torch.no_grad():
            norm = (base_weight(self.base_layer) + self.delta_weight()).norm(dim=0)
        return (self.dora_scale[0] / norm).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return self.base_forward(x)
        if self.dora_scale is not None:
            x = x * self.dora_factor(x.dtype)
        out = self.base_forward(x)
        # in place (the addition keeps neither operand for the backward): the layer's result is the
        # base output allocated first, and the fp32 update, freed right away, leaves no hole below it
        return out.add_(self.update(x).to(out.dtype))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Part name (as the file's key ends) -> tensor, possibly a shard."""
        parts = {name: p.detach() for name, p in self.named_parameters()}
        parts["alpha"] = self.alpha.detach()
        return parts
