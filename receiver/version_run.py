"""One version on a receiver: bucket validation and slicing, and the iterator fed to load_weights.

``prepare`` runs on the daemon's loop as buckets arrive: it checks every entry
against the version's manifest and slices the slot into typed zero-copy views.
``iterate`` runs in the apply thread: it yields ``(name, view)`` pairs and acks a
bucket only once the consumer asked for the item after its last entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..protocol import messages as m
from ..protocol.dtypes import DTYPES
from ..protocol.errors import ProtocolError, VersionAborted
from ..protocol.tensors import INT_OF_ITEMSIZE, Framework
from ..protocol.transport import ImportedSlot
from .prefetch import PrefetchQueue

_NUMPY_DTYPES = tuple(d.numpy for d in DTYPES)
_TORCH_VIEWS: tuple[tuple[np.dtype, Any], ...] | None = None
_from_numpy: Any = None


def _torch_view_table() -> tuple[tuple[np.dtype, Any], ...]:
    """Per dtype code: the same-width NumPy int to view slot bytes as, and the torch dtype to
    reinterpret that as (None when torch.from_numpy already gives the right dtype)."""
    global _TORCH_VIEWS, _from_numpy
    if _TORCH_VIEWS is None:
        import torch

        _from_numpy = torch.from_numpy
        table = []
        for d in DTYPES:
            as_ints = INT_OF_ITEMSIZE[d.itemsize] if d.name != "bool" else np.dtype(np.bool_)
            target = d.torch()
            table.append((as_ints, None if torch.from_numpy(np.zeros(1, as_ints)).dtype == target else target))
        _TORCH_VIEWS = tuple(table)
    return _TORCH_VIEWS



@dataclass
class PreparedBucket:
    seq: int
    slot: int
    mapping: ImportedSlot
    checksum: int | None
    used: int  # end of the last piece in the slot: the checksummed range
    # (name, typed view, -1) for a whole tensor; (name, raw uint8 piece, byte offset) for a chunk
    entries: list[tuple[str, Any, int]]


class VersionRun:
    def __init__(
        self,
        begin: m.Begin,
        *,
        framework: Framework,
        queue: PrefetchQueue,
        timeout: float,
        on_ack: Callable[[int, int], None],
        destination: Callable[[str], np.ndarray | None] | None = None,
    ) -> None:
        self.version = begin.version
        self.num_buckets = begin.buckets
        self.total_tensors = len(begin.names)
        self.total_bytes = begin.total_bytes
        self.manifest: dict[str, tuple[int, tuple[int, ...], int]] = {
            name: (code, tuple(shape), m.tensor_nbytes(code, shape))
            for name, code, shape in zip(begin.names, begin.dtypes, begin.shapes)
        }
        self.framework = framework
        self.queue = queue
        self.timeout = timeout
        self._on_ack = on_ack
        self._destination = destination
        # loop side
        self.next_seq = 0
        self._received: dict[str, int] = {}
        # consumer side
        self.applied = 0
        self.touched = False  # something was handed to load_weights or written in place
        self.finished = False
        self._partial: dict[str, tuple[Any, bool]] = {}
        # set by the daemon
        self.commit_requested = False
        self.applied_ok = False
        self.started = 0.0
        self.staged = False  # staged mode: the consumer only copies; the model is untouched

    # --- loop side -----------------------------------------------------------------------

    def prepare(self, msg: m.Bucket, slot: ImportedSlot) -> PreparedBucket:
        if msg.seq != self.next_seq:
            raise ProtocolError(f"BUCKET: field 'seq': expected {self.next_seq}, got {msg.seq}")
        if msg.seq >= self.num_buckets:
            raise ProtocolError(f"BUCKET: field 'seq': version {self.version!r} has {self.num_buckets} buckets, got seq {msg.seq}")
        self.next_seq += 1
        entries: list[tuple[str, Any, int]] = []
        manifest, received, framework = self.manifest, self._received, self.framework
        host = slot.domain == "host" and framework == "numpy"
        np_dtypes = _NUMPY_DTYPES
        torch_views = _torch_view_table() if slot.domain == "host" and framework == "torch" else None
        for name, code, shape, offset, nbytes, chunk in zip(
            msg.names, msg.dtypes, msg.shapes, msg.offsets, msg.nbytes, msg.chunks
        ):
            spec = manifest.get(name)
            if spec is None:
                raise ProtocolError(f"BUCKET {msg.seq}: tensor {name[:80]!r} is not in the manifest of {self.version!r}")
            want_code, want_shape, full = spec
            if code != want_code or tuple(shape) != want_shape:
                raise ProtocolError(
                    f"BUCKET {msg.seq}: tensor {name[:80]!r}: expected {DTYPES[want_code].name}{list(want_shape)} "
                    f"as in BEGIN, got {DTYPES[code].name}{shape}"
                )
            have = received.get(name)
            if (have is not None and have >= full) or chunk != (have or 0):
                raise ProtocolError(
                    f"BUCKET {msg.seq}: tensor {name[:80]!r}: expected bytes from offset {have or 0}, got a piece at {chunk}"
                    " (duplicate or out-of-order piece)"
                )
            received[name] = chunk + nbytes
            data = slot.raw(offset, nbytes)
            if chunk == 0 and nbytes == full:
                if host:  # the hot path for many small tensors: a plain NumPy view
                    entries.append((name, data.view(np_dtypes[code]).reshape(want_shape), -1))
                elif torch_views is not None:  # same for torch: ints of the same width, then reinterpret
                    as_ints, target = torch_views[code]
                    tensor = _from_numpy(data.view(as_ints).reshape(want_shape))
                    entries.append((name, tensor if target is None else tensor.view(target), -1))
                else:
                    entries.append((name, slot.typed(framework, data, DTYPES[code], want_shape), -1))
            else:
                entries.append((name, data, chunk))
        used = max((o + n for o, n in zip(msg.offsets, msg.nbytes)), default=0)
        return PreparedBucket(msg.seq, msg.slot, slot, msg.checksum, used, entries)

    # --- consumer side -----------------------------------------------------------------

    def iterate(self) -> Iterator[tuple[str, Any]]:
        for _ in range(self.num_buckets):
            bucket: PreparedBucket = self.queue.get(self.timeout)
            if bucket.checksum is not None:
                got = bucket.mapping.digest(bucket.used)
                if got != bucket.checksum:  # checked before any byte of the bucket is applied
                    raise VersionAborted(
                        f"bucket {bucket.seq} of {self.version!r} failed its checksum (expected {bucket.checksum:#018x}, "
                        f"got {got:#018x}): the slot was overwritten or corrupted in transit; the version was not committed"
                    )
            for name, data, chunk in bucket.entries:
                if chunk >= 0:
                    data = self._write_piece(bucket.mapping, name, data, chunk)
                    if data is None:  # held in scratch until complete, or written in place
                        continue
                if not self.staged:
                    self.touched = True  # load_weights gets it: the model may change from here on
                yield name, data
                self.applied += 1
            bucket.mapping.sync()  # e.g. a CUDA stream sync: copies out of the slot must be complete
            self._on_ack(bucket.seq, bucket.slot)
        self.finished = True

    def _write_piece(self, slot: ImportedSlot, name: str, data: Any, chunk: int) -> Any | None:
        """Write a chunk into its destination; return a view to yield once complete."""
        code, shape, full = self.manifest[name]
        held = self._partial.get(name)
        if held is None:
            usable = self._destination is not None and slot.domain == "host" and not self.staged
            dest = self._destination(name) if usable else None
            if dest is not None and dest.nbytes == full and dest.dtype == np.uint8:
                held = (dest, True)  # the model's own memory: no full-size temporary
            else:
                held = (slot.scratch(full), False)
            self._partial[name] = held
        buf, in_place = held
        if in_place:
            self.touched = True  # the model's own memory is written from here on
        slot.copy(buf, chunk, data)
        end = chunk + data.nbytes
        if end < full:
            return None
        del self._partial[name]
        if in_place:
            self.applied += 1
            return None
        return slot.typed(self.framework, buf, DTYPES[code], shape)

    @property
    def complete(self) -> bool:
        return self.finished and self.applied == self.total_tensors
