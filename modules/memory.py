"""Giving freed host memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache


@cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Collect garbage and ask glibc to return freed heap pages (quantization leaves many small holes
    that the allocator would otherwise keep). Does nothing where malloc_trim does not exist."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
LOADING_MMAP_THRESHOLD = 1 << 20
RUNNING_MMAP_THRESHOLD = 32 << 20  # glibc's own upper bound for its sliding threshold on 64-bit systems


def set_mmap_threshold(threshold: int) -> None:
    """Serve every allocation above ``threshold`` bytes with its own mapping, returned to the system on
    free, and everything smaller from the heap. glibc otherwise slides this threshold up after the
    first large free. While fp8 weights load, LOADING_MMAP_THRESHOLD keeps the many layer-sized
    temporaries of quantizing out of the heap (measured on a Lite DiT: +1 GB of resident memory
    otherwise); once loaded, RUNNING_MMAP_THRESHOLD serves a forward's activations from the heap
    without a page fault per allocation (about 25% of a CPU forward's time). Process-wide."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
