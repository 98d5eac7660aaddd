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


class FP8ScaleError(ValueError):
    pass


def check_scale(scale: torch.Tensor, name: str, source: str) -> torch.Tensor:
    """An fp8 weight's scale as read from a file: every value finite and positive, or a named error (a
    scale of 0 zeroes its layer, NaN poisons every output; neither comes from a sound quantizer)."""
    bad = ~torch.isfinite(scale) | (scale <= 0)
    if bool(bad.any()):
        values = scale[bad].flatten()[:3].tolist()
        raise FP8ScaleError(
            f"{source}: the fp8 scale {name} holds {int(bad.sum())} value(s) that are not finite and positive "
            f"(such as {values}): the file is damaged or not a sound fp8 checkpoint"
        )
    return scale


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


def dequantize_weight(
    quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """The weight in ``dtype``, computed in ``dtype`` itself: e4m3 values are exact in bf16/fp16 and the
    product is rounded once, which keeps the memory traffic of a forward low (no fp32 copy).
    bf16 and fp32 on the CPU go through :func:`_from_e4m3_bits` (the same result, about 10x faster
    than PyTorch's CPU float8 cast); ``scratch`` (bytes, at least the weight's size in ``dtype``) is
    then used as the output's memory."""
    out_features, in_features = quantized.shape
    if dtype in E4M3_BIT_LAYOUT and quantized.device.type == "cpu" and float(scale.max()) < MAX_BITS_SCALE:
        weight = _from_e4m3_bits(quantized, dtype, scratch)
        scale = (scale * E4M3_BITS_FACTOR).to(dtype)
    else:
        weight, scale = quantized.to(dtype), scale.to(dtype)
    if scale.ndim == 3:
        weight.view(out_features, scale.shape[1], -1).mul_(scale)
    else:
        weight.mul_(scale)
    return weight


# The bits of an e4m3 number moved into the sign, the low exponent bits and the high mantissa bits of
# a bf16 or fp32 make a number worth exactly 2**-120 times it (subnormals included): the exponent
# biases are 7 and 127. The scale is therefore taken 2**120 times.
E4M3_BITS_FACTOR = 2.0**120
MAX_BITS_SCALE = 2.0**7  # the scale times 2**120 stays finite, in bf16 too
# dtype: (integer type of its width, shift that puts e4m3's exponent above the mantissa, mask of the
# sign bit and the 7 bits below it: 0x87FF and 0x87F00000 as signed integers)
E4M3_BIT_LAYOUT = {torch.bfloat16: (torch.int16, 4, -0x7801), torch.float32: (torch.int32, 20, -0x78100000)}


def _from_e4m3_bits(quantized: torch.Tensor, dtype: torch.dtype, scratch: torch.Tensor | None) -> torch.Tensor:
    """Values 2**-120 times those of the e4m3 ``quantized``, in ``dtype``, made with three integer passes."""
    integer, shift, mask = E4M3_BIT_LAYOUT[dtype]
    if scratch is None:
        bits = torch.empty(quantized.shape, dtype=integer)
    else:
        bits = scratch[: quantized.numel() * dtype.itemsize].view(integer).view(quantized.shape)
    bits.copy_(quantized.view(torch.int8))  # sign-extended: the sign fills the high bits
    bits.bitwise_left_shift_(shift).bitwise_and_(mask)
    return bits.view(dtype)


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
        # Without autograd the dequantized weight is dead once the matmul returns, so on the CPU every
        # layer reuses one buffer (no page faults of a fresh layer-sized allocation each time).
        reuse = x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)
        scratch = _cpu_scratch(self.weight.numel() * x.dtype.itemsize) if reuse else None
        weight = dequantize_weight(self.weight, self.scale_weight, x.dtype, scratch)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        scale = "block" if self.scale_weight.ndim == 3 else "row"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 with {scale} scales"


_scratch: list[torch.Tensor] = []


def _cpu_scratch(nbytes: int) -> torch.Tensor:
    """One CPU byte buffer shared by all fp8 layers, grown to the largest dequantized weight asked for."""
    if not _scratch or _scratch[0].numel() < nbytes:
        _scratch[:] = [torch.empty(nbytes, dtype=torch.uint8)]
    return _scratch[0]


def quantize_linears(model: nn.Module, include: Callable[[str], bool], block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Replace, one at a time, every nn.Linear whose name ``include`` accepts by an FP8Linear; returns the count."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and include(name)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(getattr(parent, child), block_size))
    return len(names)
