"""The fp8 formats a DiT checkpoint can be in, told apart by their markers, never by key names alone.

- ``block``: this toolkit's block-scaled float8_e4m3fn (``_make_fp8_ckpt.py``). Marker: the metadata
  key ``fp8_format``. Each quantized Linear has ``<layer>.scale_weight`` of shape (out, in/block, 1),
  or (out, 1) when the input width is not a multiple of the block.
- ``comfy_scaled``: ComfyUI's ``*_fp8_scaled.safetensors``. Marker: a ``scaled_fp8`` tensor. Each
  quantized Linear has one scalar ``<layer>.scale_weight`` (weight = fp8 value x scale);
  ``<layer>.scale_input`` is for fp8 matmuls and not needed here.
- ``comfy_quant``: ComfyUI's newer quantized layout. Marker: ``<layer>.comfy_quant`` on each quantized
  Linear, the UTF-8 JSON of its format (only ``{"format": "float8_e4m3fn"}`` is read here), with one
  scalar ``<layer>.weight_scale``; ``<layer>.input_scale`` is not needed either.

A file with fp8 scales but no marker, or with two markers, is refused by name: reading a scale in the
wrong format would silently give wrong weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

OUR_MARKER = "fp8_format"  # metadata key
COMFY_SCALED_MARKER = "scaled_fp8"  # tensor key
COMFY_QUANT_SUFFIX = ".comfy_quant"
SCALE_SUFFIXES = {"block": ".scale_weight", "comfy_scaled": ".scale_weight", "comfy_quant": ".weight_scale"}
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
# keys that are never model parameters (for the architecture check; which ones count depends on the format)
SIDE_SUFFIXES = (".scale_weight", ".weight_scale", COMFY_QUANT_SUFFIX, *INPUT_SCALE_SUFFIXES)
COMFY_FP8_FORMATS = ("float8_e4m3fn",)


class FP8FormatError(ValueError):
    pass


@dataclass
class FP8Layout:
    """``scales``: module name -> the key of its weight scale; ``ignored``: keys that are no parameter."""

    format: str | None = None
    scales: dict[str, str] = field(default_factory=dict)
    ignored: set[str] = field(default_factory=set)


def is_side_key(key: str) -> bool:
    """A key that holds no model parameter in any fp8 format (a scale, a marker)."""
    return key == COMFY_SCALED_MARKER or key.endswith(SIDE_SUFFIXES)


def detect_format(keys: list[str], metadata: Mapping[str, str], source: str) -> str | None:
    markers = []
    if OUR_MARKER in metadata:
        markers.append("block")
    if COMFY_SCALED_MARKER in keys:
        markers.append("comfy_scaled")
    if any(key.endswith(COMFY_QUANT_SUFFIX) for key in keys):
        markers.append("comfy_quant")
    if len(markers) > 1:
        raise FP8FormatError(f"{source} carries the markers of several fp8 formats ({', '.join(markers)}): ambiguous")
    scales = [key for key in keys if key.endswith((".scale_weight", ".weight_scale"))]
    if scales and not markers:
        raise FP8FormatError(
            f"{source} holds fp8 scales ({scales[0]}, ...) but no marker saying their format: neither this "
            f"toolkit's ('{OUR_MARKER}' metadata) nor ComfyUI's (a '{COMFY_SCALED_MARKER}' tensor, or "
            f"'<layer>{COMFY_QUANT_SUFFIX}' entries). Convert the original weights again, or use the file as published"
        )
    return markers[0] if markers else None


def fp8_layout(
    keys: list[str], metadata: Mapping[str, str], source: str, read: Callable[[str], torch.Tensor]
) -> FP8Layout:
    """The format of a checkpoint with model keys ``keys`` and ``metadata``; ``read(key)`` reads a tensor
    (the small comfy_quant entries are read to check their format)."""
    fmt = detect_format(keys, metadata, source)
    if fmt is None:
        return FP8Layout()
    suffix = SCALE_SUFFIXES[fmt]
    scales = {key[: -len(suffix)]: key for key in keys if key.endswith(suffix)}
    ignored = {key for key in keys if key.endswith(INPUT_SCALE_SUFFIXES) or key == COMFY_SCALED_MARKER}
    if fmt == "comfy_quant":
        for key in (k for k in keys if k.endswith(COMFY_QUANT_SUFFIX)):
            ignored.add(key)
            layer = key[: -len(COMFY_QUANT_SUFFIX)]
            try:
                settings = json.loads(bytes(read(key).to(torch.uint8).tolist()))
            except (ValueError, UnicodeDecodeError) as error:
                raise FP8FormatError(f"{source}: {key} is not the JSON of a quantization format ({error})") from None
            if settings.get("format") not in COMFY_FP8_FORMATS:
                raise FP8FormatError(
                    f"{source}: {layer} is quantized as {settings.get('format')!r}; only "
                    f"{', '.join(COMFY_FP8_FORMATS)} files are read here (load the bf16 file instead)"
                )
            if layer not in scales:
                raise FP8FormatError(f"{source}: {layer} is marked {COMFY_QUANT_SUFFIX} but has no {layer}{suffix}")
    return FP8Layout(fmt, scales, ignored)


def as_scale(scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """A scale as FP8Linear takes it: ComfyUI's one scalar per layer becomes a (1, 1) row scale."""
    if fmt == "block":
        return scale
    if scale.numel() != 1:
        raise FP8FormatError(f"a {fmt} scale should be one number per layer, found shape {list(scale.shape)}")
    return scale.reshape(1, 1)
