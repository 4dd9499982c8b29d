"""A read-only list of Python objects stored as one pickled byte buffer."""
from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import Any

import numpy as np


class PackedList:
    """Holds picklable items in a single numpy byte array plus an offset array.

    DataLoader workers are forked from the main process and share its memory copy-on-write,
    but merely reading a Python object updates its reference count, which copies the page it
    lives on. With ~118K COCO records held as Python lists, every worker of every rank would
    slowly duplicate them. Two numpy arrays hold no per-item Python objects, so they stay
    shared; an item is unpickled on access.
    """

    def __init__(self, items: Iterable[Any]):
        blobs = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        self._offsets = np.cumsum([0] + [len(blob) for blob in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        start, end = self._offsets[index], self._offsets[index + 1]
        return pickle.loads(self._buffer[start:end].tobytes())
