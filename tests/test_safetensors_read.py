"""The checkpoint reader: the same tensors as the safetensors library, without mapping the file."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from modules.safetensors_read import SafetensorsFile, SafetensorsFormatError

from .training_helpers import ROOT


def test_every_dtype_reads_as_the_safetensors_library_reads_it(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, 2, generator=g).bfloat16(),
        "f16": torch.randn(4, generator=g).half(),
        "fp8": torch.randn(6, 8, generator=g).to(torch.float8_e4m3fn),
        "i64": torch.arange(5),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"kind": "test"})
    reference = load_file(str(path))
    with SafetensorsFile(path) as f:
        assert f.metadata() == {"kind": "test"} and set(f.keys()) == set(tensors)
        for key, tensor in reference.items():
            read = f.get_tensor(key)
            assert read.dtype == tensor.dtype and read.shape == tensor.shape and f.shape(key) == tuple(tensor.shape)
            assert torch.equal(read.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
            assert read.data_ptr() % 64 == 0  # memory of its own, aligned for the matmul kernels


def write_raw(path, header: dict, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "within the file"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, "within the file"),
        ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4, "unreadable header entry"),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_a_damaged_file_is_named_with_what_is_wrong(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, data)
    with pytest.raises(SafetensorsFormatError, match=message):
        SafetensorsFile(path)


def test_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\xff" * 7)
    with pytest.raises(SafetensorsFormatError, match="shorter than a safetensors header"):
        SafetensorsFile(path)
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(SafetensorsFormatError, match="does not fit the file"):
        SafetensorsFile(path)


LIMITED = """
import resource, sys, torch
from safetensors import safe_open
from modules.safetensors_read import SafetensorsFile
path = sys.argv[1]
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 150 * 2**20, resource.RLIM_INFINITY))
with SafetensorsFile(path) as f:
    total = sum(float(f.get_tensor(k).float().sum()) for k in f.keys())
print("ours", total)
try:
    with safe_open(path, framework="pt") as f:
        f.get_tensor(next(iter(f.keys())))
    print("library read it")
except Exception as error:
    print("library failed:", error)
"""


def test_a_file_larger_than_the_memory_allowed_reads_tensor_by_tensor(tmp_path):
    """With less address space than the file (as with less memory than a 38.6 GB checkpoint, no swap),
    mapping the file fails; reading it a tensor at a time does not."""
    path = tmp_path / "large.safetensors"
    save_file({f"w{i}": torch.full((1024, 1024), float(i)) for i in range(80)}, str(path))  # 320 MiB
    result = subprocess.run(
        [sys.executable, "-c", LIMITED, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"ours {float(sum(range(80)) * 1024 * 1024)}" in result.stdout
    assert "library failed" in result.stdout and "allocate" in result.stdout.lower()
