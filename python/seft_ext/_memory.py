"""Keep the process's RSS near what it uses: glibc's malloc returns large freed blocks to the system.

glibc serves an allocation of at least M_MMAP_THRESHOLD bytes with its own memory map and
unmaps it on free, but by default it raises that threshold to the size of each such block
freed (up to 32 MiB on 64-bit): after the first tensors are freed, tensors of a few MiB come
from the heap, and a heap keeps its freed memory. Measured on the default job (SmolLM2-135M,
4 x 256 tokens): the training phase peaked 1.26 GB higher that way. Fixing the threshold at
256 KiB keeps every tensor above it in a map of its own, freed at once.
"""
from __future__ import annotations

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
