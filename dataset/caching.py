"""What both caching scripts share: the failure report, bounded prefetching, stale-cache cleanup."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from .cache_files import WRITER, cache_metadata, item_key_of, recipes_of, set_recipes

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
    recipe: str,
) -> None:
    """Delete the cache files matching ``pattern`` that this dataset config wrote (its ``recipe``) and
    this run did not produce (unless ``keep_cache``). Files of items that failed this time are kept (an
    old cache beats none), and so are other configs' files in the same folder and files this toolkit
    did not write."""
    stale, shared, others = [], [], 0
    for path in cache_directory.glob(pattern):
        if path in produced or item_key_of(path) in failed_keys:
            continue
        metadata = cache_metadata(path)
        if metadata.get("writer") != WRITER:
            continue
        recipes = recipes_of(metadata)
        if recipes is not None and recipe not in recipes:
            others += 1
        elif recipes is not None and len(recipes) > 1:
            shared.append((path, recipes - {recipe}))  # still another config's: only this one lets go
        else:
            stale.append(path)
    if others:
        tqdm.write(f"{label}: {others} caches of other dataset configs in {cache_directory} left as they are")
    if not keep_cache:
        for path, remaining in shared:
            set_recipes(path, remaining)
    if not stale:
        return
    if not keep_cache:
        for path in stale:
            path.unlink()
        report.deleted += len(stale)
    verb = "kept (--keep_cache)" if keep_cache else "deleted"
    tqdm.write(f"{label}: {len(stale)} stale caches of this config (items it no longer has or makes) {verb}")
