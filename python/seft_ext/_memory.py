"""Keep the process's RSS near what it uses: glibc's malloc returns large freed blocks to the system.

glibc serves an allocation of at least M_MMAP_THRESHOLD bytes with its own memory map and
unmaps it on free, but by default it raises that threshold to the size of each such block
freed (up to 32 MiB on 64-bit): after the first tensors are freed, tensors of a few MiB come
from the heap, and a heap keeps its freed memory. Measured on the default job (SmolLM2-135M,
4 x 256 tokens): the training phase peaked 1.26 GB higher that way. Fixing the threshold at
256 KiB keeps every tensor above it in a map of its own, freed at once.

That alone makes every large tensor a fresh map whose pages fault in (zeroed) on first touch:
about 2 million page faults per training step of the default job, half its time. The driver
therefore also turns on the caching CPU allocator (``ops.cpu_cache``): blocks freed in a step
are handed to the next step's tensors of the same size, and the cache is emptied between the
run's phases, whose shapes differ. ``SEFT_CPU_CACHE=0`` in the environment leaves it off.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3
THRESHOLD = 256 * 1024


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold (see the module doc); True when set. Nothing happens off Linux /
    glibc, or when MALLOC_MMAP_THRESHOLD_ is set in the environment (the user's choice wins)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def cpu_cache_on():
    """The caching CPU allocator on for the block (see the module doc), then off again (freeing
    what it holds) unless it was on before. Nothing changes where the native library did not
    load or ``SEFT_CPU_CACHE=0``."""
    from . import _lib, ops

    if os.environ.get("SEFT_CPU_CACHE", "1") == "0" or _lib.load_error is not None or ops.cpu_cache()["enabled"]:
        yield
        return
    ops.cpu_cache(True)
    try:
        yield
    finally:
        ops.cpu_cache(False)


def new_phase() -> None:
    """Free what the caching CPU allocator holds (the next phase allocates other shapes)."""
    from . import _lib, ops

    if _lib.load_error is None:
        ops.cpu_cache(empty=True)
