"""Slots in host memory: how tensors are written into them and read out of them, whoever owns
the memory (a shared-memory segment, or a private buffer a network transport receives into).

A slot class gives ``host_view()`` (its flat uint8 array) and ``streams`` (whether copies into
or out of it bypass the cache, see :mod:`.shm.streaming`); these mixins do the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ... import native as speedups
from ...frameworks import host_bytes, view_as
from ..dtypes import DType
from ..errors import TransportError
from .base import Landing, PushLayout, SlotReader, SlotWriter, StreamSpec, host_digest, transfer_spans

SMALL_COPY = 64 << 10  # below this a memoryview copy beats a call into C (~3x less per-tensor overhead)


def write_one(write: Callable[[int, np.ndarray, int, int], None], mv: memoryview, offset: int, tensor: Any, n: int) -> bool:
    """One whole tensor into a slot; False if it is not ``n`` bytes. A small C-contiguous NumPy
    array takes a memoryview copy into ``mv`` with no intermediate view (~0.4 us over the memcpy,
    against ~1.3 us through ``write``); anything else, and big tensors (whose copy releases the
    GIL), take ``write(offset, source, start, nbytes)``."""
    if n <= SMALL_COPY and type(tensor) is np.ndarray:
        try:
            if tensor.dtype.kind != "V":
                mv[offset : offset + n] = tensor.data.cast("B")
            else:  # bfloat16/float8 (ml_dtypes) export no buffer format: go through uint8
                mv[offset : offset + n] = tensor.view(np.uint8).data.cast("B")
            return True
        except (TypeError, ValueError):  # not C-contiguous, 0-d, or not n bytes: the checked path
            pass
    source = host_bytes(tensor)
    if source.nbytes != n:
        return False
    if n:
        write(offset, source, 0, n)
    return True


class HostSlotWriter(SlotWriter):
    """The sender's writes into a host slot (``host_view()``, ``streams`` and ``_mv``, a
    memoryview of the view, come from the slot)."""

    streams = False
    _mv: memoryview

    def host_view(self) -> np.ndarray:
        raise NotImplementedError

    def source_bytes(self, tensor: Any) -> np.ndarray:
        return host_bytes(tensor)

    def write(self, offset: int, source: np.ndarray, start: int, nbytes: int) -> None:
        if nbytes <= SMALL_COPY:  # per-tensor overhead dominates: a memoryview copy is ~3x cheaper
            self._mv[offset : offset + nbytes] = source.data[start : start + nbytes]
        else:  # the GIL is released for big copies, so the I/O thread keeps running
            speedups.copy(self.host_view()[offset : offset + nbytes], source[start : start + nbytes], self.streams)

    def write_tensors(self, offsets: list[int], tensors: Sequence[Any], nbytes: list[int]) -> int | None:
        """Whole tensors at ``offsets``. The C accelerator copies every C-contiguous buffer of the
        right size (~0.1 us per tensor over the memcpy); the rest, and everything without it,
        takes :func:`write_one`."""
        count, view = len(tensors), self.host_view()
        i = speedups.gather(view, offsets, nbytes, tensors, 0, self.streams)
        while i < count:
            if not write_one(self.write, self._mv, offsets[i], tensors[i], nbytes[i]):
                return i
            i = speedups.gather(view, offsets, nbytes, tensors, i + 1, self.streams)
        return None

    def digest(self, nbytes: int) -> int:
        return host_digest(self.host_view()[:nbytes])


class DirectPieces(HostSlotWriter):
    """A network transport's host slot on the sender: a piece of at least ``direct_min`` bytes is
    not packed but remembered, and moved from the tensor's own memory (see ``transfer_spans``):
    one memcpy less per byte of large tensors. The tensor must not change until the bucket is
    acked, which ``push`` guarantees by returning only after every rank committed."""

    direct_min = 0  # 0: pack everything (a checksummed push digests the whole slot)
    _bucket: Any = None
    _direct: dict[int, np.ndarray]

    def writer(self, bucket: Any, layout: PushLayout, stream: StreamSpec | None) -> Any:
        self._bucket = bucket
        self._direct = {}
        return self

    def write(self, offset: int, source: np.ndarray, start: int, nbytes: int) -> None:
        if self.direct_min and nbytes >= self.direct_min:
            self._direct[offset] = source[start : start + nbytes]
        else:
            super().write(offset, source, start, nbytes)

    def write_tensors(self, offsets: list[int], tensors: Sequence[Any], nbytes: list[int]) -> int | None:
        if not self.direct_min:
            return super().write_tensors(offsets, tensors, nbytes)
        small: list[int] = []
        for i, n in enumerate(nbytes):
            if n < self.direct_min:
                small.append(i)
                continue
            source = self.source_bytes(tensors[i])
            if source.nbytes != n:
                return i
            self._direct[offsets[i]] = source
        if not small:
            return None
        changed = super().write_tensors([offsets[i] for i in small], [tensors[i] for i in small], [nbytes[i] for i in small])
        return None if changed is None else small[changed]

    def transfers(self, used: int) -> list[tuple[int, np.ndarray]]:
        """(slot offset, bytes) of each range of the bucket to move, in order."""
        bucket, view, found = self._bucket, self.host_view(), []
        for start, stop, direct in transfer_spans((bucket.offsets, bucket.nbytes), used, self.direct_min):
            data = self._direct.get(start) if direct else view[start:stop]
            if data is None or data.nbytes != stop - start:
                raise TransportError(f"internal: bucket {bucket.seq}: no {stop - start}-byte piece was written at {start}")
            found.append((start, data))
        self._direct = {}  # the tensors' memory is referenced by what was sent, no longer by the slot
        return found


class HostSlotReader(SlotReader):
    """A rank's reads out of a host slot (``host_view()`` and ``streams`` come from the slot)."""

    domain = "host"
    streams = False

    def host_view(self) -> np.ndarray:
        raise NotImplementedError

    def raw(self, offset: int, nbytes: int) -> np.ndarray:
        return self.host_view()[offset : offset + nbytes]

    def typed(self, framework: str, buffer: np.ndarray, dtype: DType, shape: tuple[int, ...]) -> Any:
        return view_as(framework, buffer, dtype, shape)  # type: ignore[arg-type]

    def scratch(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, dtype=np.uint8)

    def copy(self, dst: np.ndarray, at: int, src: np.ndarray) -> None:
        speedups.copy(dst[at : at + src.nbytes], src, self.streams)

    def sync(self) -> None:
        """Host copies are synchronous: nothing to wait for."""

    def digest(self, nbytes: int) -> int:
        return host_digest(self.host_view()[:nbytes])


class ReceivingSlot(HostSlotReader):
    """A rank's own host slot that a network transport receives each bucket into: ``receiver``
    (the transport's side of the connection) does the receiving, into ``memory`` (a private
    buffer, or a torch tensor a collective writes into)."""

    def __init__(self, size: int, receiver: Any, streams: bool, memory: Any = None) -> None:
        self.size = size
        self.streams = streams
        self.memory = private_buffer(size) if memory is None else memory
        self._view: np.ndarray = np.asarray(self.memory)  # a CPU torch tensor converts without a copy
        self._receiver = receiver

    def host_view(self) -> np.ndarray:
        return self._view

    def receive(
        self, seq: int, pieces: tuple[Any, Any] | None, used: int, check: Callable[[], None], timeout: float,
        into: Landing | None = None,
    ) -> None:
        self._receiver.receive(self, seq, pieces, used, check, timeout, into)

    def close(self) -> None:
        pass


def private_buffer(size: int) -> np.ndarray:
    """A slot's own page-aligned host buffer, every page touched now (not as faults in a push)."""
    return np.zeros(size, dtype=np.uint8)
