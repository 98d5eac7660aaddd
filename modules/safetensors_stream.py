"""Write a safetensors file one tensor at a time, so peak memory is one tensor, not the model.

The format: an 8-byte little-endian header length, a JSON header (dtype, shape and byte range of
every tensor, plus ``__metadata__``), then the tensors' raw bytes in order. Knowing every shape and
dtype in advance, the header is written first and each tensor is produced, written and dropped.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .atomic_save import atomic_path

DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float64: "F64",
}


@dataclass
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def write_streaming(path: str | os.PathLike, tensors: list[PlannedTensor], metadata: dict[str, str]) -> None:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for t in tensors:
            value = t.produce().detach().to("cpu").contiguous()
            if value.dtype != t.dtype or tuple(value.shape) != t.shape:
                raise ValueError(f"{t.name}: produced {value.dtype} {tuple(value.shape)}, planned {t.dtype} {t.shape}")
            out.write(value.reshape(-1).view(torch.uint8).numpy().tobytes())
