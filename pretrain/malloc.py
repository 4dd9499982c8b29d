"""Allocator settings for CPU training, applied by re-executing the launcher.

With default glibc malloc, buffers of 32 MiB and more are mmap'd and unmapped again on every
use, so a ResNet-50 + H2048 step page-faults about 1.6 GB per iteration (roughly a third of the
step on a 2-core VM, docs/benchmarks.md). Two remedies, best first:

* tcmalloc (Debian/Ubuntu package ``libtcmalloc-minimal4``, which ``make setup`` installs when it
  can), preloaded: it keeps freed pages for reuse, so a step is as fast as with tuned glibc, and
  it fragments less, so peak memory is about 0.25 GiB lower on the H2048 step.
* glibc tuned with ``MALLOC_MMAP_MAX_=0`` (keep big buffers on the heap) and a huge
  ``MALLOC_TRIM_THRESHOLD_`` (never hand the heap back to be re-faulted): no page faults, but
  freed holes in the heap raise peak memory by a few hundred MiB.

Both are read only at process start, hence the re-exec. Standard library only, so that it runs
before torch is imported.
"""
from __future__ import annotations

import ctypes.util
import os
import platform
import sys

TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1000000000000"}
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")


def find_tcmalloc() -> str | None:
    """The soname of an installed tcmalloc (loadable through ``LD_PRELOAD``), or None."""
    for name in TCMALLOC_LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def allocator_in_use() -> str:
    """What this process allocates with: ``tcmalloc``, another preloaded allocator by library
    name (e.g. ``libjemalloc.so.2``), ``glibc-tuned`` (:data:`TUNED_MALLOC`), ``glibc-default``
    (no ``MALLOC_*`` tunable set) or ``glibc-custom`` (other tunables: not glibc's default
    behaviour even when they repeat its default values, see :func:`reexec_with_tuned_malloc`)."""
    for library in os.environ.get("LD_PRELOAD", "").split():
        name = os.path.basename(library)
        if "malloc" in name:
            return "tcmalloc" if "tcmalloc" in name else name
    if all(os.environ.get(k) == v for k, v in TUNED_MALLOC.items()):
        return "glibc-tuned"
    return "glibc-custom" if any(k.startswith("MALLOC_") for k in os.environ) else "glibc-default"


def reexec_with_tuned_malloc() -> None:
    """Replace this process by itself with tcmalloc preloaded if installed, else tuned glibc.

    Does nothing off glibc Linux, when ``LD_PRELOAD`` already names an allocator, when
    ``VIRTEX_D2_MALLOC=default`` asks for the allocator the process started with (untouched
    glibc, e.g. for timing comparisons), or when ``MALLOC_MMAP_MAX_`` is set: that is how the
    re-executed process knows it is, and also keeps glibc for a user who sets it. Setting it, or
    any other mmap or trim tunable, even to glibc's default value, stops glibc from adapting its
    mmap threshold, so glibc with ``MALLOC_MMAP_MAX_=65536`` is slower than untouched glibc.
    """
    opted_out = "MALLOC_MMAP_MAX_" in os.environ or os.environ.get("VIRTEX_D2_MALLOC") == "default"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or opted_out:
        return
    if not allocator_in_use().startswith("glibc"):
        return
    preload = os.environ.get("LD_PRELOAD", "")
    env = {**os.environ, **TUNED_MALLOC}
    tcmalloc = find_tcmalloc()
    if tcmalloc:
        env["LD_PRELOAD"] = f"{tcmalloc} {preload}".strip()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
