"""Intel MKL's GEMM of bf16 operands into an fp32 result, called directly from PyTorch's own library.

PyTorch's x86-64 wheels link MKL into libtorch_cpu and export MKL's C interface, which includes
``cblas_gemm_bf16bf16f32``: C = A B (+ C) with bf16 A and B and fp32 accumulation and C. PyTorch
never calls it (its bf16 matmuls go to oneDNN where the CPU has AVX-512 BF16 or AMX, else to a
generic loop about 5x slower than its fp32 GEMM). MKL's kernel converts the bf16 operands while it
packs them for its fp32 micro-kernel, so on an AVX2 CPU it runs as fast as the fp32 GEMM of fp32
operands, or faster (it reads half the weight's bytes), with no fp32 copy of the weight anywhere;
its results equal the fp32 GEMM of the widened operands (the same products, summed in fp32).

:func:`available` tells whether this PyTorch has the function; :func:`mm` calls it on 2-D CPU
tensors, each row-major or transposed (a view such as ``weight.t()`` needs no copy).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS_LAYOUT / CBLAS_TRANSPOSE values
_INT_MAX = 2**31 - 1  # MKL's LP64 interface: 32-bit sizes and leading dimensions


@functools.cache
def _gemm():
    """The cblas_gemm_bf16bf16f32 of the loaded libtorch_cpu, or None where there is none."""
    if not torch.backends.mkl.is_available():
        return None
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        function = ctypes.CDLL(path).cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):  # another platform's library name, or an MKL without it
        return None
    size, pointer = ctypes.c_int, ctypes.c_void_p
    function.restype = None
    function.argtypes = [size, size, size, size, size, size, ctypes.c_float, pointer, size, pointer, size]
    function.argtypes += [ctypes.c_float, pointer, size]
    return function


def available() -> bool:
    """Whether MKL's bf16 x bf16 -> fp32 GEMM can be called in this process."""
    return _gemm() is not None


def _operand(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(tensor, CBLAS transpose flag, leading dimension) of a 2-D matrix as MKL's row-major interface
    takes it: a row-major matrix as it is, a transposed view of one with the transpose flag, anything
    else copied to row-major."""
    rows, columns = t.shape
    if t.stride(1) == 1 and t.stride(0) >= max(1, columns):
        return t, _NO_TRANS, max(1, t.stride(0))
    if t.stride(0) == 1 and t.stride(1) >= max(1, rows):
        return t, _TRANS, max(1, t.stride(1))
    t = t.contiguous()
    return t, _NO_TRANS, max(1, columns)


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """``out`` = a @ b (``accumulate``: ``out`` += a @ b) for bf16 CPU matrices a (m, k) and b (k, n)
    and an fp32 ``out`` (m, n) with contiguous rows (a block of columns of a wider matrix will do);
    returns ``out``."""
    function = _gemm()
    if function is None:
        raise RuntimeError("MKL's cblas_gemm_bf16bf16f32 is not in this PyTorch (see modules/mkl_bf16.available)")
    (m, k), (k_b, n) = a.shape, b.shape
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16 or a.device.type != "cpu" or b.device.type != "cpu":
        got = f"{a.dtype} on {a.device} and {b.dtype} on {b.device}"
        raise ValueError(f"mkl_bf16.mm takes bf16 CPU matrices, got {got}")
    if k != k_b or out.shape != (m, n) or out.dtype != torch.float32:
        raise ValueError(f"mkl_bf16.mm: {tuple(a.shape)} @ {tuple(b.shape)} into {out.dtype} {tuple(out.shape)}")
    ldc = out.stride(0) if m > 1 else max(1, n)  # how far apart out's rows lie
    if (n > 1 and out.stride(1) != 1) or ldc < n:
        raise ValueError(f"mkl_bf16.mm: the rows of out must be contiguous, got strides {out.stride()}")
    if max(m, n, k, *a.stride(), *b.stride(), *out.stride()) > _INT_MAX:
        raise ValueError(f"mkl_bf16.mm: sizes over 2**31 ({tuple(a.shape)} @ {tuple(b.shape)})")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out if accumulate else out.zero_()
    a, trans_a, lda = _operand(a)
    b, trans_b, ldb = _operand(b)
    beta = 1.0 if accumulate else 0.0
    a_ptr, b_ptr, out_ptr = a.data_ptr(), b.data_ptr(), out.data_ptr()
    function(_ROW_MAJOR, trans_a, trans_b, m, n, k, 1.0, a_ptr, lda, b_ptr, ldb, beta, out_ptr, max(1, ldc))
    return out
