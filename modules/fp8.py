"""Block-scaled float8 (e4m3) weights for Linear layers.

A weight (out, in) is split along its input dimension into blocks of ``block_size``; each block
gets one fp32 scale = max|w| / 448 (the largest e4m3 value), and the weight is stored as
round(w / scale) in float8_e4m3fn: half the bytes of bf16, relative RMS error about 2-3 %.
The scale is kept as (out, in / block_size, 1), or (out, 1) when the input dimension does not
divide into blocks; a checkpoint stores it as ``<module>.scale_weight``. The forward
dequantizes to the input's dtype and runs an ordinary matmul, so it works on any device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
DEFAULT_BLOCK_SIZE = 64


def quantize_weight(weight: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight (out, in), fp32 scale (out, in/bs, 1) or (out, 1) when ``in`` is not a multiple of bs)."""
    w = weight.float()
    out_features, in_features = w.shape
    if in_features % block_size == 0:
        blocks = w.view(out_features, in_features // block_size, block_size)
        scale = blocks.abs().amax(dim=2, keepdim=True).div(FP8_MAX).clamp(min=1e-12)
        quantized = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(out_features, in_features)
    else:
        scale = w.abs().amax(dim=1, keepdim=True).div(FP8_MAX).clamp(min=1e-12)
        quantized = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale


def dequantize_weight(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in ``dtype``, computed in ``dtype`` itself: e4m3 values are exact in bf16/fp16 and the
    product is rounded once, which keeps the memory traffic of a forward low (no fp32 copy)."""
    out_features, in_features = quantized.shape
    weight = quantized.to(dtype)
    if scale.ndim == 3:
        weight.view(out_features, scale.shape[1], -1).mul_(scale.to(dtype))
    else:
        weight.mul_(scale.to(dtype))
    return weight


class FP8Linear(nn.Module):
    """A frozen Linear layer with block-scaled fp8 weights, dequantized on the fly."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale_weight", scale.float())
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = DEFAULT_BLOCK_SIZE) -> FP8Linear:
        quantized, scale = quantize_weight(linear.weight.detach(), block_size)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(quantized, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_weight(self.weight, self.scale_weight, x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        scale = "block" if self.scale_weight.ndim == 3 else "row"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 with {scale} scales"


def quantize_linears(model: nn.Module, include: Callable[[str], bool], block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Replace, one at a time, every nn.Linear whose name ``include`` accepts by an FP8Linear; returns the count."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and include(name)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(getattr(parent, child), block_size))
    return len(names)
