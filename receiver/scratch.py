"""Host scratch for tensors larger than a bucket, kept for the next one.

A tensor larger than a bucket that ``load_weights`` takes as a view is assembled in scratch
first. Fresh memory costs a page fault per page and the kernel's zeroing, and on a VM that
gives freed memory back to its host (free page reporting) much more: on a 2-core AMD EPYC
Firecracker VM, allocating and filling 409 MiB took 79-974 ms against 37 ms into memory
touched before, and a 2 GiB model with two 409 MiB embeddings took 1.1-1.8 s a version to a
views rank. So a rank hands each such buffer back once the consumer moved past the bucket that
yielded it (the view is no longer valid then, as for any view into a slot) and the next such
tensor, in this version or the next, reuses it. At most :data:`KEEP` buffers are kept, each the
size of the largest such tensor: the two that the memory bound already allows for (the engine's
loop variable keeps the last view alive while the next tensor is assembled).
"""

from __future__ import annotations

import numpy as np

KEEP = 2  # free buffers kept between tensors and versions, the newest first


class ScratchPool:
    """Free host buffers, each as large as the largest tensor asked for so far, so that any kept
    buffer serves any such tensor: which tensors overlap (one's view still out while the next is
    assembled) then does not matter, and a layout that repeats allocates nothing after its second
    version (the first finds the largest size, the second how many overlap at it). A buffer
    smaller than that largest is dropped, not kept; at most ``keep`` are kept."""

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self.largest = 0  # bytes of the largest tensor asked for
        self._free: list[np.ndarray] = []  # flat uint8, newest last

    def take(self, nbytes: int) -> np.ndarray:
        """A flat uint8 buffer of ``nbytes``: a kept one's first bytes if one is kept, else the first
        bytes of a new one as large as the largest asked for. Give back what ``take`` returned
        (:meth:`give` finds its base)."""
        if nbytes > self.largest:  # every kept buffer is the old largest's size: none fits now
            self.largest = nbytes
            self._free.clear()
        if self._free:
            return self._free.pop()[:nbytes]
        return np.empty(self.largest, np.uint8)[:nbytes]

    def give(self, buf: np.ndarray) -> None:
        """``buf`` (from :meth:`take`) is free again: kept if as large as the largest asked for,
        dropping the oldest beyond ``keep``."""
        base = buf.base if isinstance(buf.base, np.ndarray) else buf
        if base.nbytes < self.largest or any(kept is base for kept in self._free):
            return
        self._free.append(base)
        del self._free[: max(0, len(self._free) - self.keep)]

    @property
    def kept_bytes(self) -> int:
        return sum(buf.nbytes for buf in self._free)

    def clear(self) -> None:
        self._free.clear()
