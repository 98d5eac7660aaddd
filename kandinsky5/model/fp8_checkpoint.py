"""Convert a DiT checkpoint to fp8: the block Linear weights become block-scaled float8_e4m3fn with
``<module>.scale_weight`` beside them; everything else is copied as it is. Streams one tensor at a
time (read, converted, written out), so memory use does not grow with the model."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from kandinsky5.model.checkpoint import (
    FP8_SCALE_SUFFIX,
    CheckpointError,
    checkpoint_files,
    is_fp8_target,
    read_fp8_layout,
    read_layout,
)
from modules.fp8 import DEFAULT_BLOCK_SIZE, FP8_DTYPE, quantize_weight
from modules.safetensors_read import SafetensorsFile
from modules.safetensors_stream import PlannedTensor, write_streaming

FORMAT_NOTE = "block-scaled float8_e4m3fn (kandinsky5 toolkit)"


def _read(file: Path, key: str) -> torch.Tensor:
    with SafetensorsFile(file) as f:
        return f.get_tensor(key)


def _quantized(name: str, file: Path, key: str, shape: tuple, block_size: int, done, delta=None) -> list[PlannedTensor]:
    """The fp8 weight and its scale; the scale is made with the weight and written right after it."""
    out_features, in_features = shape
    blocks = in_features % block_size == 0
    scale_shape = (out_features, in_features // block_size, 1) if blocks else (out_features, 1)
    made: dict[str, torch.Tensor] = {}

    def weight() -> torch.Tensor:
        value = _read(file, key)
        if delta is not None:
            value = delta(value.float())
        made["weight"], made["scale"] = quantize_weight(value, block_size)
        done()
        return made.pop("weight")

    scale_name = name[: -len(".weight")] + FP8_SCALE_SUFFIX
    return [
        PlannedTensor(name, FP8_DTYPE, shape, weight),
        PlannedTensor(scale_name, torch.float32, scale_shape, lambda: made.pop("scale")),
    ]


def _copied(name: str, file: Path, key: str, shape: tuple, done, delta=None) -> PlannedTensor:
    with SafetensorsFile(file) as f:
        dtype = f.dtype(key)

    def tensor() -> torch.Tensor:
        done()
        value = _read(file, key)
        return value if delta is None else delta(value.float()).to(value.dtype)

    return PlannedTensor(name, dtype, shape, tensor)


def rewrite_checkpoint(
    source: str | Path,
    output: str | Path,
    fp8: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    deltas: dict | None = None,
) -> int:
    """Write ``source`` to ``output`` with ``deltas`` (module name -> function merging LoRAs into the fp32
    weight) applied and, with ``fp8``, the block Linear weights quantized; returns how many weights changed."""
    files = checkpoint_files(source)
    layout = read_layout(files)
    already_fp8 = read_fp8_layout(files, layout, str(source)).format is not None
    if fp8 and already_fp8:
        raise CheckpointError(f"{source} is already an fp8 checkpoint")
    if deltas and already_fp8:
        raise CheckpointError(f"{source} is an fp8 checkpoint: merge LoRAs into the original, then convert")
    with SafetensorsFile(files[0]) as f:
        metadata = f.metadata()
    if fp8:
        metadata.update({"fp8_format": FORMAT_NOTE, "fp8_block_size": str(block_size)})
    bar = tqdm(total=len(layout), desc="writing", unit="tensor")
    done = lambda: bar.update(1)  # noqa: E731
    deltas, plan, changed = dict(deltas or {}), [], 0
    for name, (file, key, shape) in layout.items():
        delta = deltas.get(name[: -len(".weight")]) if name.endswith(".weight") else None
        if fp8 and is_fp8_target(name) and len(shape) == 2:
            plan += _quantized(name, file, key, tuple(shape), block_size, done, delta)
        else:
            plan.append(_copied(name, file, key, tuple(shape), done, delta))
        changed += bool(delta) or (fp8 and is_fp8_target(name) and len(shape) == 2)
    write_streaming(output, plan, metadata)
    bar.close()
    return changed


def convert_to_fp8(source: str | Path, output: str | Path, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Write the fp8 checkpoint; returns the number of quantized weights."""
    return rewrite_checkpoint(source, output, fp8=True, block_size=block_size)
