"""Caching with several processes (``accelerate launch --num_processes N`` in front of a caching
script): each process takes every N-th item of each dataset and writes its caches, and the first
process prints one summary for all of them. A single process (plain ``python``) is the case N = 1.

The processes talk over gloo (a CPU channel, also on GPU machines: only reports cross it)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch.distributed as dist

from .caching import CacheReport

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    count: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Processes:
        """This process's place among those that torchrun / accelerate launch started."""
        count = int(os.environ.get("WORLD_SIZE", "1"))
        if count > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")
        return cls(int(os.environ.get("RANK", "0")), count, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This process's items: every count-th one, starting at its rank (each item goes to one process)."""
        return items[self.rank :: self.count]

    def device(self, device: str) -> str:
        """``cuda`` means this process's own GPU when several processes run."""
        return f"cuda:{self.local_rank}" if self.count > 1 and device == "cuda" else device

    def barrier(self) -> None:
        if self.count > 1:
            dist.barrier()

    def all(self, value: T) -> list[T]:
        """``value`` of every process, in rank order (the value itself when alone)."""
        if self.count == 1:
            return [value]
        values: list = [None] * self.count
        dist.all_gather_object(values, value)
        return values

    def finish(self) -> None:
        """Leave together: a process that exits while another still waits on it makes that one abort."""
        if self.count > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def union(self, values: set[T]) -> set[T]:
        return set().union(*self.all(values))

    def merge(self, report: CacheReport) -> CacheReport:
        """One report of what all processes did."""
        reports = self.all(report)
        merged = CacheReport()
        for part in reports:
            merged.written += part.written
            merged.skipped += part.skipped
            merged.deleted += part.deleted
            merged.failures += part.failures
        return merged


ONE_PROCESS = Processes()
