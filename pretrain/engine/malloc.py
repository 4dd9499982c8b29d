"""glibc allocator settings for CPU training, applied by re-executing the launcher.

With default glibc malloc, buffers of 32 MiB and more are mmap'd and unmapped again on every
use, so a ResNet-50 + H2048 step page-faults about 1.6 GB per iteration (roughly a third of the
step on a 2-core VM, docs/benchmarks.md). ``MALLOC_MMAP_MAX_=0`` keeps them on the heap and a
huge ``MALLOC_TRIM_THRESHOLD_`` stops the heap from being returned and re-faulted; peak memory
is unchanged. glibc reads these only at process start, hence the re-exec. Standard library
only, so that it runs before torch is imported.
"""
from __future__ import annotations

import os
import platform
import sys

TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1000000000000"}


def malloc_is_tuned() -> bool:
    return all(os.environ.get(k) == v for k, v in TUNED_MALLOC.items())


def reexec_with_tuned_malloc() -> None:
    """Replace this process by itself with :data:`TUNED_MALLOC` set (glibc only).

    Does nothing when ``MALLOC_MMAP_MAX_`` is already set, which is also how a user opts out
    (e.g. ``MALLOC_MMAP_MAX_=65536``, glibc's default).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_MAX_" in os.environ:
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TUNED_MALLOC})
