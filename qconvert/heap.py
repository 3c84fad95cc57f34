"""glibc's heap, set for each pass's pattern of allocations.

Calibration holds many activations of a few MB at once: hand freed memory back to the OS, so peak RSS
stays that of the live tensors (glibc keeps freed memory otherwise, and RSS creeps up block after
block). The streaming pass allocates and frees one tensor's buffers after another: keep them in the
heap, so each tensor reuses the last one's pages instead of faulting in fresh ones."""

import ctypes
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


@cache  # asked between every calibration round
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc: nothing to do


def release_freed_memory() -> None:
    """Return the free pages of the heap, including those between live chunks, to the OS."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def map_large_allocations(threshold: int = 4 << 20) -> None:
    """Give every allocation of at least `threshold` bytes its own mapping, returned whole when freed.

    glibc raises this threshold as large blocks are freed (up to 32 MB), after which activations of a
    few MB come from the heap, where the ones still held pin the pages of the ones freed around them.
    A single-pass block (`sequential.py`) holds every batch's activations at once: on SmolLM2 with
    128 x 512 tokens this took its peak from 1.29 GB to 0.97 GB (with a trim between rounds), for
    about 0.1 s per block of page faults.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def reuse_freed_memory(largest: int = 256 << 20) -> None:
    """Serve allocations up to `largest` bytes from the heap and keep freed memory there (up to 1 GB at
    its top), so a pass that allocates and frees buffers of similar sizes reuses the same pages.

    Each mapping of its own costs a page fault per 4 kB the first time it is written, and is unmapped
    when freed: reading a 1.46 GB checkpoint into fresh buffers faulted in every page. On the 730M
    Llama this took the conversion from 2.96 to 2.67 s (system time 1.22 to 0.99 s) for ~15 MB more
    peak RSS (farm-bench, 6 paired runs).
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, largest)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
