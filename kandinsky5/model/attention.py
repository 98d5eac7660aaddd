"""Attention backends behind one function.

Every backend takes q, k, v laid out (batch, tokens, heads, head_dim) and an optional key padding
mask (batch, key_tokens), True where a key is real. Backends whose kernels take no mask (flash-attn,
FlashAttention 3, SageAttention) run each sample on its own valid keys instead, which is exactly
what the mask means; xformers gets its own block-diagonal bias from the same lengths.

The optional packages are imported only when their backend is chosen, so a missing package is an
error naming what to install, never an import-time crash.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    module: str | None  # the Python module the kernel comes from (None: part of torch)
    pip_name: str | None
    needs_cuda: bool


BACKENDS = {
    "sdpa": Backend("sdpa", None, None, needs_cuda=False),
    "flash_attn": Backend("flash_attn", "flash_attn", "flash-attn", needs_cuda=True),
    "flash3": Backend(
        "flash3",
        "flash_attn_interface",
        "flash-attn 3 (built from the flash-attention hopper/ folder)",
        needs_cuda=True,
    ),
    "xformers": Backend("xformers", "xformers.ops", "xformers", needs_cuda=True),
    "sage": Backend("sage", "sageattention", "sageattention", needs_cuda=True),
}
DEFAULT_BACKEND = "sdpa"
AUTO = "auto"
# Exact kernels, fastest first; sage is left out because it quantizes q and k to int8.
AUTO_ORDER_CUDA = ("flash3", "flash_attn", "xformers")


class AttentionBackendError(ValueError):
    """An attention backend that cannot run here: the scripts print it as one line, before loading."""


# The command-line flag of each backend where it differs from the backend's name.
FLAG_OF = {"sage": "sage_attn"}


def attention_backend(options) -> str:
    """The backend the scripts' options ask for (``--sdpa``, ``--flash_attn``, ...), else ``auto``."""
    return next((name for name in BACKENDS if getattr(options, FLAG_OF.get(name, name), False)), AUTO)


def _import_backend(backend: Backend):
    try:
        return importlib.import_module(backend.module)
    except ImportError as error:
        raise AttentionBackendError(
            f"attention backend {backend.name!r} needs the package {backend.pip_name!r}, which is not installed "
            f"({error}). Install it (pip install {backend.pip_name.split(' ')[0]}) or use --sdpa, which needs nothing."
        ) from None


def auto_backend(device: torch.device | str | None) -> str:
    """The fastest exact backend installed for ``device``: on CUDA FlashAttention 3 (Hopper and newer),
    FlashAttention 2, then xformers; sdpa when none of them is installed and on every other device."""
    device = torch.device(device or "cpu")
    if device.type != "cuda":
        return DEFAULT_BACKEND
    for name in AUTO_ORDER_CUDA:
        if name == "flash3" and torch.cuda.get_device_capability(device)[0] < 9:
            continue
        try:
            importlib.import_module(BACKENDS[name].module)
        except ImportError:
            continue
        return name
    return DEFAULT_BACKEND


def check_backend(name: str, device: torch.device | str | None = None) -> None:
    """Raise a clear error if backend ``name`` cannot run here (unknown, package missing, no CUDA)."""
    if name == AUTO:
        return
    if name not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    backend = BACKENDS[name]
    if backend.module is not None:
        _import_backend(backend)
    if backend.needs_cuda and device is not None and torch.device(device).type != "cuda":
        raise AttentionBackendError(
            f"attention backend {name!r} runs only on CUDA GPUs, but the model is on {torch.device(device)}; "
            "use --sdpa on this device."
        )


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _kernel(name: str) -> Kernel:
    if name == "flash_attn":
        return _import_backend(BACKENDS[name]).flash_attn_func
    if name == "flash3":
        flash3 = _import_backend(BACKENDS[name]).flash_attn_func

        def kernel(q, k, v):
            out = flash3(q, k, v)
            return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE

        return kernel
    if name == "sage":
        sage = _import_backend(BACKENDS[name]).sageattn
        return lambda q, k, v: sage(q, k, v, tensor_layout="NHD")
    if name == "xformers":
        return _import_backend(BACKENDS[name]).memory_efficient_attention
    return _sdpa


def per_sample_attention(kernel: Kernel, q, k, v, key_lengths: list[int]) -> torch.Tensor:
    """Run a mask-less ``kernel`` one sample at a time on that sample's valid keys."""
    outputs = [kernel(q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n]) for i, n in enumerate(key_lengths)]
    return torch.cat(outputs, dim=0)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    backend: str = DEFAULT_BACKEND,
) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(head_dim); (B, S, H, D) in, (B, S, H, D) out.

    ``key_mask`` must be a right-padding mask (each row: True then False), as the text encoder makes.
    """
    if backend == "sdpa":
        return _sdpa(q, k, v, key_mask)
    kernel = _kernel(backend)
    if key_mask is None:
        return kernel(q, k, v)
    return per_sample_attention(kernel, q, k, v, key_mask.sum(dim=1).tolist())
