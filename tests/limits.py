"""A machine limit the tests can impose without root."""
from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Writes of this process and its children past ``size`` bytes fail with a real
    ``OSError(EFBIG)`` from the kernel (Python ignores SIGXFSZ), as they fail with ``ENOSPC`` on a
    full disk: the same error of ``write()``, reached through torch's own zip writer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
