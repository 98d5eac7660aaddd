"""Reading a wandb offline run file (run-*.wandb): leveldb-log blocks of protobuf records, behind a
7-byte header. wandb 0.31 no longer ships a Python reader for them."""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7  # ":W&B", a 2-byte magic number, a version byte
FULL, LAST = 1, 4


def run_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    position, pending = HEADER, b""
    while position + 7 <= len(data):
        left = BLOCK - position % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def logged(path: Path) -> tuple[str, list[dict[str, str]]]:
    """The run's name and, per logged step, the keys with their JSON values."""
    name, history = "", []
    for record in run_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return name, history
