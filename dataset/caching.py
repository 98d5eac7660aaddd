"""What both caching scripts share: the failure report, bounded prefetching, stale-cache cleanup."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from .cache_files import item_key_of, written_by_us

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class CacheReport:
    written: int = 0
    skipped: int = 0
    deleted: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def fail(self, what: str | Path, reason: str) -> None:
        self.failures.append((str(what), reason))
        tqdm.write(f"failed: {what}: {reason}")

    def summary(self, processes: int = 1) -> str:
        lines = [
            f"cached {self.written}, already up to date {self.skipped}, failed {len(self.failures)}, "
            f"stale caches deleted {self.deleted}" + (f" (by {processes} processes)" if processes > 1 else "")
        ]
        lines += [f"  {what}: {reason}" for what, reason in self.failures]
        return "\n".join(lines)


def prefetch(load: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R | Exception]]:
    """``load(item)`` for each item in order, run ahead on ``workers`` threads (at most 2 x workers
    items in flight, so memory stays bounded); an exception is yielded in place of the result."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: list[tuple[T, Future]] = []
        position = 0
        while position < len(items) or pending:
            while position < len(items) and len(pending) < 2 * max(1, workers):
                pending.append((items[position], pool.submit(load, items[position])))
                position += 1
            item, future = pending.pop(0)
            try:
                yield item, future.result()
            except Exception as error:  # reported per item by the caller
                yield item, error


def remove_stale(
    cache_directory: Path,
    pattern: str,
    produced: set[Path],
    failed_keys: set[str],
    keep_cache: bool,
    report: CacheReport,
    label: str,
) -> None:
    """Delete the cache files matching ``pattern`` that this run did not produce (unless ``keep_cache``).
    Files of items that failed this time are kept: an old cache beats none; files this toolkit did not
    write are never touched."""
    stale = [
        p
        for p in cache_directory.glob(pattern)
        if p not in produced and item_key_of(p) not in failed_keys and written_by_us(p)
    ]
    if not stale:
        return
    if not keep_cache:
        for path in stale:
            path.unlink()
        report.deleted += len(stale)
    verb = "kept (--keep_cache)" if keep_cache else "deleted"
    tqdm.write(f"{label}: {len(stale)} stale caches of items no longer in the dataset {verb}")
