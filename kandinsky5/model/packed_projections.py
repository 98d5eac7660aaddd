"""Several Linear layers that read the same input, run as one matmul.

``allocate_packed`` gives the layers weights (and biases) that lie side by side in one buffer, each
layer's parameter a view of its rows, for the checkpoint loader to fill in place; the module tree,
the state-dict keys and every single layer stay as they were. ``packed_outputs`` then computes all
the layers' outputs with one ``F.linear`` over the whole buffer (no copy) and splits the result.
Whenever the weights are no longer side by side (moved or cast one by one, swapped to another
device) or a layer's forward has been replaced (a LoRA branch, an fp8 layer), it returns None and
the caller runs the layers one by one, so packing can only change speed, never which computation
runs. When the outputs take part in a backward, each is copied into a tensor of its own: a view of
the packed result that a later operation saves (attention saves v) would keep all of it alive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def allocate_packed(layers: tuple[nn.Module, ...], dtype: torch.dtype, device: torch.device | str) -> None:
    """Give ``layers`` uninitialized parameters that already lie side by side, for a loader to fill in
    place (packing while loading leaves no freed copies behind)."""
    for name in ("weight", "bias"):
        shapes = [getattr(layer, name).shape for layer in layers]
        rows = sum(shape[0] for shape in shapes)
        _share(layers, name, torch.empty((rows, *shapes[0][1:]), dtype=dtype, device=device))


def _share(layers: tuple[nn.Module, ...], name: str, buffer: torch.Tensor) -> None:
    """Each layer's parameter ``name`` becomes its rows of ``buffer`` (frozen, like the loaded model)."""
    start = 0
    for layer in layers:
        rows = getattr(layer, name).shape[0]
        layer._parameters[name] = nn.Parameter(buffer[start : start + rows], requires_grad=False)
        start += rows


def packed_outputs(layers: tuple[nn.Module, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """Every layer applied to ``x``, from one matmul; None unless the layers' parameters lie side by side.
    Under torch.compile it is always None: the address checks cannot be traced (they would split the
    compiled graph), and the compiler schedules the separate matmuls itself."""
    if torch.compiler.is_compiling() or not _plain(layers):
        return None
    weight = _side_by_side([layer.weight for layer in layers])
    bias = _side_by_side([layer.bias for layer in layers])
    if weight is None or bias is None:
        return None
    outputs = F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)
    if torch.is_grad_enabled():  # each its own tensor: one saved for a backward (attention keeps v)
        return tuple(output.contiguous() for output in outputs)  # must not keep the others alive
    return outputs


def _plain(layers) -> bool:
    """Ordinary nn.Linear layers with biases whose forward nobody replaced (LoRA sets ``forward``)."""
    return all(type(layer) is nn.Linear and layer.bias is not None and "forward" not in vars(layer) for layer in layers)


def _side_by_side(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One view over ``tensors`` if each starts where the one before ends, in the same storage."""
    first = tensors[0]
    if any(tensor.requires_grad for tensor in tensors):  # a trained weight needs its own gradient
        return None
    storage, address = first.untyped_storage().data_ptr(), first.data_ptr()
    for tensor in tensors:
        if (
            tensor.data_ptr() != address
            or not tensor.is_contiguous()
            or tensor.untyped_storage().data_ptr() != storage
            or tensor.dtype != first.dtype
            or tensor.shape[1:] != first.shape[1:]
        ):
            return None
        address += tensor.numel() * tensor.element_size()
    rows = sum(tensor.shape[0] for tensor in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride())
