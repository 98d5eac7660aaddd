"""Batches moved to the training device one step ahead, so the copy overlaps the current step."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small CPU tensor on ``device`` without waiting for the work already queued there: on CUDA a
    copy from pageable memory makes the host wait for the stream, one from pinned memory does not."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def prefetch_to(batches: Iterable[dict], device: torch.device | str) -> Iterator[dict]:
    """Yield each batch (a dict) with its tensors on ``device``. On CUDA the next batch is copied on a
    side stream (from pinned memory when the loader pins it) while the current one is in use; on
    other devices batches pass through unchanged (the model moves them)."""
    device = torch.device(device)
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)

    def start_copy(batch: dict | None) -> dict | None:
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            return _to_device(batch, device)

    source = iter(batches)
    ahead = start_copy(next(source, None))
    while ahead is not None:
        compute.wait_stream(stream)  # the copy of this batch has finished before the step uses it
        current = ahead
        for value in current.values():
            if isinstance(value, torch.Tensor):
                value.record_stream(compute)  # memory made on the side stream, used on the compute stream
        ahead = start_copy(next(source, None))
        yield current
