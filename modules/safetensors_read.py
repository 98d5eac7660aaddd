"""Read a safetensors file one tensor at a time with plain reads, never mapping the whole file.

The safetensors library maps the whole file into memory; the kernel counts a private mapping as
memory the process may need, so on a machine with less memory than the file (no swap, the default
overcommit heuristic) opening a 38.6 GB Pro checkpoint fails with "Cannot allocate memory". Here
the header is parsed and checked (dtype, shape and byte range of every tensor lie within the file)
and each tensor is read straight into memory of its own: peak memory is one tensor, and the file's
pages stay page cache. The format is the one modules/safetensors_stream.py writes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from .safetensors_stream import DTYPE_NAMES

DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


class SafetensorsFormatError(ValueError):
    pass


class SafetensorsFile:
    """``keys()``, ``shape(key)``, ``dtype(key)``, ``metadata()`` from the header; ``get_tensor(key)``
    reads one tensor (to ``device`` when given)."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu"):
        self.path, self.device = Path(path), torch.device(device)
        self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close() / the context manager)
        try:
            self._entries, self._metadata, self._data_start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], dict, int]:
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise SafetensorsFormatError("the file is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER or 8 + length > size:
            raise SafetensorsFormatError(f"header length {length} does not fit the file ({size} bytes)")
        try:
            header = json.loads(self._file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SafetensorsFormatError(f"the header is not JSON ({error})") from None
        if not isinstance(header, dict):
            raise SafetensorsFormatError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start, entries = 8 + length, {}
        for key, entry in header.items():
            try:
                dtype, shape, (begin, end) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsFormatError(f"tensor {key!r}: unreadable header entry {entry!r}") from None
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if not (0 <= begin <= end and end - begin == nbytes and data_start + end <= size):
                raise SafetensorsFormatError(
                    f"tensor {key!r}: bytes {begin}..{end} do not hold a {entry['dtype']} tensor of shape "
                    f"{list(shape)} within the file"
                )
            entries[key] = (dtype, shape, begin, end)
        return entries, metadata, data_start

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def get_tensor(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            view, done = memoryview(raw.numpy()), 0
            while done < end - begin:  # a read may return fewer bytes than asked
                count = os.preadv(self._file.fileno(), [view[done:]], self._data_start + begin + done)
                if count == 0:
                    raise SafetensorsFormatError(f"{self.path} ended while reading tensor {key!r}")
                done += count
        tensor = raw.view(dtype).reshape(shape)
        return tensor if self.device.type == "cpu" else tensor.to(self.device)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
