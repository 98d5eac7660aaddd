"""bf16 and fp16 matmuls on CPUs that have no native kernel for them, computed as fp32 matmuls.

A CPU without AVX-512 (most AMD Zen 2/3 and older Intel parts) has no oneDNN kernel for bf16 or fp16
matrix products: PyTorch then falls back to a generic loop that runs about 5x slower than its fp32
GEMM on the same cores. A product of bf16 operands accumulated in fp32 is exactly what an fp32 GEMM
computes on the operands widened to fp32 (bf16 and fp16 values are exact in fp32), so on such a CPU
each reduced-precision matmul here widens its operands and runs in fp32, then rounds the result to
the input's dtype once, as a native kernel does: the same numbers up to the order of the sums.

A Linear weight is widened a block of rows at a time (about CHUNK_BYTES of fp32, which stays in the
cache while the GEMM reads it), so the fp32 copy of a weight never exists whole in memory: the
model's weights stay bf16, and the memory traffic is that of reading them once.

``wide_cpu_matmuls()`` tells whether this applies here (no native kernel for the dtype, or the
KANDINSKY5_CPU_MATMUL=fp32 override); KANDINSKY5_CPU_MATMUL=native turns it off. Everything else
(GPUs, fp32, a CPU with native bf16) goes straight to F.linear / torch.matmul.
"""

from __future__ import annotations

import functools
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 4 * 2**20  # fp32 bytes of one widened block of weight rows
ENV_OVERRIDE = "KANDINSKY5_CPU_MATMUL"  # "fp32", "native" or unset (decided by the CPU)
REDUCED = (torch.bfloat16, torch.float16)
_forced: list[bool | None] = [None]


@functools.cache
def _native_kernel(dtype: torch.dtype) -> bool:
    """Whether this CPU has oneDNN kernels for ``dtype`` matmuls (AVX-512 / AVX-NE-CONVERT / AMX or Arm)."""
    try:
        check = {
            torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
            torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,
        }
        return bool(check[dtype]())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN has no fast kernel either
        return False


def _override() -> bool | None:
    value = os.environ.get(ENV_OVERRIDE, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("fp32", "native"):
        raise ValueError(f"{ENV_OVERRIDE}={value!r}: expected 'fp32', 'native' or 'auto'")
    return value == "fp32"


def set_wide_cpu_matmuls(enabled: bool | None) -> None:
    """Force the fp32 path on (True) or off (False) for CPU bf16/fp16 matmuls; None: decide by the CPU
    (and the KANDINSKY5_CPU_MATMUL variable)."""
    _forced[0] = enabled


def wide_cpu_matmuls(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether CPU matmuls in ``dtype`` run here as fp32 matmuls of the widened operands."""
    if dtype not in REDUCED:
        return False
    if _forced[0] is not None:
        return _forced[0]
    override = _override()
    return (not _native_kernel(dtype)) if override is None else override


def _widen(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a product of ``a`` and ``b`` takes the fp32 path: both CPU tensors of one reduced dtype."""
    return a.device.type == "cpu" and b.device.type == "cpu" and a.dtype == b.dtype and wide_cpu_matmuls(a.dtype)


def _rows_per_chunk(in_features: int) -> int:
    return max(16, CHUNK_BYTES // (4 * in_features))


def _row_blocks(weight: torch.Tensor):
    """(start, end) of each block of ``weight``'s rows that is widened at once: as few blocks as
    CHUNK_BYTES allows, their sizes at most one row apart (a short last block would be a GEMM too
    thin to run fast)."""
    total = weight.shape[0]
    count = -(-total // _rows_per_chunk(weight.shape[1]))
    size, longer = divmod(total, count)
    start = 0
    for index in range(count):
        end = start + size + (index < longer)
        yield start, end
        start = end


_scratch = threading.local()


def _widened(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` in fp32. In eager mode the copy goes into one reused buffer per thread: a fresh
    allocation for every block costs about 3x the conversion itself. The result is valid until the
    next call in the same thread."""
    if torch.compiler.is_compiling():
        return rows.float()
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < rows.numel():
        buffer = _scratch.buffer = torch.empty(rows.numel(), dtype=torch.float32)
    return buffer[: rows.numel()].view(rows.shape).copy_(rows)


def _wide_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias with fp32 arithmetic, weight widened a block of rows at a time; x's dtype out."""
    x32 = x.float()
    if weight.shape[0] <= _rows_per_chunk(weight.shape[1]):
        return F.linear(x32, _widened(weight), None if bias is None else bias.float()).to(x.dtype)
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    for start, end in _row_blocks(weight):
        part_bias = None if bias is None else bias[start:end].float()
        out[..., start:end] = F.linear(x32, _widened(weight[start:end]), part_bias)
    return out


class _WideLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _wide_linear_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        grad32 = grad_out.float().reshape(-1, weight.shape[0])
        if ctx.needs_input_grad[0]:
            for start, end in _row_blocks(weight):  # the sum over output features, a block at a time
                part = grad32[:, start:end]
                if start == 0:
                    grad_x = part @ _widened(weight[start:end])
                else:
                    grad_x.addmm_(part, _widened(weight[start:end]))
            grad_x = grad_x.to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad32.t() @ x.float().reshape(-1, weight.shape[1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad32.sum(0).to(weight.dtype)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, run in fp32 on CPUs without native kernels for x's dtype (see the module docstring)."""
    if not _widen(x, weight) or (bias is not None and bias.dtype != weight.dtype):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _WideLinear.apply(x, weight, bias)
    return _wide_linear_forward(x, weight, bias)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.matmul of two tensors of one reduced dtype, in fp32 on CPUs without native kernels for it
    (operands of at most a few MB, as attention's value product: widened whole)."""
    if not _widen(a, b):
        return torch.matmul(a, b)
    return torch.matmul(a.float(), b.float()).to(a.dtype)


def _untouched_linear(layer: nn.Module) -> bool:
    """A plain nn.Linear whose forward nobody replaced (a LoRA or :func:`widen_linears` sets ``forward``)."""
    return type(layer) is nn.Linear and "forward" not in vars(layer)


def run_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; a plain nn.Linear whose forward nobody replaced goes through :func:`linear`."""
    if _untouched_linear(layer):
        return linear(x, layer.weight, layer.bias)
    return layer(x)


def linear_forward(layer: nn.Module):
    """A forward for ``layer``: :func:`linear` over its current weights if it is a plain nn.Linear, else its own."""
    if type(layer) is not nn.Linear:
        return layer.forward
    return lambda x: linear(x, layer.weight, layer.bias)


def widen_linears(model: nn.Module) -> int:
    """Route every plain nn.Linear of a model we do not build ourselves (the text encoders) through
    :func:`linear`; returns how many. Harmless where the fp32 path does not apply (it then calls F.linear)."""
    count = 0
    for module in model.modules():
        if _untouched_linear(module):
            module.forward = linear_forward(module)
            count += 1
    return count
