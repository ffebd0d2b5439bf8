"""One version on a receiver: bucket validation and slicing, and the iterator fed to load_weights.

``prepare`` runs on the daemon's loop as buckets arrive: it checks that the bucket
continues the version's manifest in order (vectorised over its packed arrays, no
per-entry lookups) and slices the slot into typed zero-copy views. ``iterate`` runs in the apply
thread: it yields ``(name, view)`` pairs and acks a bucket only once the consumer
asked for the item after its last entry.

Direct mode: when the sink can say where a tensor's bytes live (``destination``)
and the manifest was checked against that sink, whole tensors are copied from the
slot straight into the model's memory by the iterator itself; no view is made and
``load_weights`` sees only the tensors without a destination. At 100k small
tensors that is most of the receiver's per-tensor cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import native as speedups
from ..frameworks import INT_OF_ITEMSIZE, Framework, bytes_view, host_bytes
from ..protocol import messages as m
from ..protocol.dtypes import DTYPES
from ..protocol.errors import ManifestMismatch, ProtocolError, VersionAborted
from ..protocol.transports import ImportedSlot, StreamRead
from .prefetch import PrefetchQueue
from .run_manifest import RunManifest, address_of

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
    # direct mode: the whole tensors, as (manifest index of the first, their slot offsets as
    # int64); the rest (chunk pieces) stay in ``entries``
    whole: tuple[int, np.ndarray] | None = None
    # a streamed bucket (read as the sender writes it): the entries' (offset, nbytes) in the slot,
    # and how many entries come before the whole tensors (all of it is read in offset order)
    streamed: bool = False
    spans: list[tuple[int, int]] | None = None
    head: int = 0


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
        direct: bool = False,
        manifest: RunManifest | None = None,
        targets_owner: Any = None,
        alignment: int = m.ALIGNMENT,
    ) -> None:
        self.version = begin.version
        self.num_buckets = begin.buckets
        self.total_bytes = begin.total_bytes
        # the manifest, in the order buckets must deliver it (the daemon's, reused across versions;
        # a reusing BEGIN carries none of its own)
        self.manifest = manifest if manifest is not None else RunManifest(begin)
        self.total_tensors = len(self.manifest)
        self.alignment = alignment  # the session's: a packed bucket's offsets are derived with it
        self.names, self.dtypes, self.fulls = self.manifest.names, self.manifest.codes, self.manifest.fulls
        self._index: dict[str, int] = {}  # name -> manifest index, built on the first chunk piece
        self.framework = framework
        self.queue = queue
        self.timeout = timeout
        self._on_ack = on_ack
        self._destination = destination
        self.direct = direct and destination is not None
        self._targets_owner = targets_owner  # the object whose identity keeps direct targets valid
        # loop side: the next manifest entry expected, and how many of its bytes came already
        self.next_seq = 0
        self._cursor = 0
        self._cursor_bytes = 0
        # consumer side
        self.applied = 0
        self.touched = False  # something was handed to load_weights or written in place
        self.last_given: str | None = None  # the tensor load_weights was given last (named when it raises)
        self.finished = False
        self._partial: dict[str, tuple[Any, bool]] = {}
        self._in_place_done: tuple[int, np.ndarray] | None = None  # the chunked tensor last completed in place
        self._ties: dict[int, int] = {}  # direct mode: tensors tied in this model, sent apart (set by iterate)
        self._alias_dests: dict[str, np.ndarray | None] = {}
        # set by the daemon
        self.applied_ok = False  # every byte applied (staged: held); PREPARED went out
        self.commit_started = False  # COMMIT arrived: the version is decided, never aborted now
        self.held: list[tuple[str, Any]] | None = None  # staged: the version's copies until COMMIT
        self.swap_task: Any = None  # staged: the load_weights call COMMIT started
        self.prepared_seconds = 0.0
        self.started = 0.0
        self.staged = False  # staged mode: the consumer only copies; the model is untouched
        # set by the daemon when this rank said READY streamed: its index among a streamed bucket's
        # consumers, and the check that raises once the version was aborted
        self.streamed = False
        self.stream_index = 0
        self.check: Callable[[], None] = lambda: None

    # --- loop side -----------------------------------------------------------------------

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return self.manifest.shapes

    def prepare(self, msg: m.Bucket, slot: ImportedSlot) -> PreparedBucket:
        if msg.seq != self.next_seq:
            raise ProtocolError(f"BUCKET: field 'seq': expected {self.next_seq}, got {msg.seq}")
        if msg.seq >= self.num_buckets:
            raise ProtocolError(f"BUCKET: field 'seq': version {self.version!r} has {self.num_buckets} buckets, got seq {msg.seq}")
        streamed = self._streamed(msg, slot)
        if msg.count is None:
            offsets, nbytes, chunks = msg.arrays()
            first = self._advance(msg, offsets, nbytes, chunks)
        else:
            offsets, nbytes, chunks = self.manifest.packed_entries(msg, self.alignment, slot.size)
            first = self._advance_whole(msg)
        self.next_seq += 1
        n = len(offsets)
        used = int((offsets + nbytes).max()) if n else 0
        if not (self.direct and slot.domain == "host"):
            pieces = zip(range(first, first + n), offsets.tolist(), nbytes.tolist(), chunks.tolist())
            entries = [self._entry(slot, *piece) for piece in pieces]
            return PreparedBucket(msg.seq, msg.slot, slot, msg.checksum, used, entries)
        # Only the first and the last entry can be chunk pieces; the whole tensors between go direct.
        fulls, lo, hi = self.fulls, 0, n
        if n and (chunks[0] or nbytes[0] != fulls[first]):
            lo = 1
        if hi > lo and (chunks[hi - 1] or nbytes[hi - 1] != fulls[first + hi - 1]):
            hi -= 1
        ends = [*range(lo), *range(hi, n)]
        if not streamed:
            entries = [self._entry(slot, first + k, int(offsets[k]), int(nbytes[k]), int(chunks[k])) for k in ends]
            whole = (first + lo, offsets[lo:hi]) if hi > lo else None
            return PreparedBucket(msg.seq, msg.slot, slot, msg.checksum, used, entries, whole)
        # streamed: only chunk pieces and whole tensors with an address (the rank said so at READY)
        entries = [(self.names[first + k], None, int(chunks[k])) for k in ends]
        spans = [(int(offsets[k]), int(nbytes[k])) for k in ends]
        whole = (first + lo, offsets[lo:hi]) if hi > lo else None
        return PreparedBucket(msg.seq, msg.slot, slot, None, used, entries, whole, True, spans, lo)

    def _streamed(self, msg: m.Bucket, slot: ImportedSlot) -> bool:
        if not msg.ring:
            return False
        if not slot.can_stream or not self.streamed or not self.direct:
            raise ProtocolError(
                f"BUCKET {msg.seq}: field 'ring': expected none, since this rank did not offer to take "
                f"{self.version!r} streamed (READY streamed), got ring=True"
            )
        if msg.checksum is not None:
            raise ProtocolError(f"BUCKET {msg.seq}: fields 'ring' and 'checksum': a streamed bucket cannot be checksummed")
        return True

    def _advance(self, msg: m.Bucket, offsets: np.ndarray, nbytes: np.ndarray, chunks: np.ndarray) -> int:
        """Check that the bucket continues the manifest in order; return its first manifest index."""
        first, done, n = self._cursor, self._cursor_bytes, len(offsets)
        names = self.names
        if msg.first != first:
            want = f"{first} ({names[first][:80]!r})" if first < len(names) else f"{first} (the end)"
            raise ProtocolError(
                f"BUCKET {msg.seq}: field 'first': expected manifest index {want}, got {msg.first} "
                "(buckets carry the BEGIN manifest in order; duplicate, missing or out-of-order bucket)"
            )
        if n == 0:
            return first
        end = first + n
        if end > len(names):
            raise ProtocolError(
                f"BUCKET {msg.seq}: {n} entries from manifest index {first} run past the {len(names)} tensors "
                f"of {self.version!r}"
            )
        # Each piece must start where the tensor's bytes left off (only the first may continue a
        # chunked tensor), every piece but the last must finish its tensor, and a piece is empty
        # only for an empty tensor.
        sizes = self.manifest.sizes[first:end]
        starts = np.zeros(n, np.int64)
        starts[0] = done
        rest = sizes - starts
        bad = (chunks != starts) | (nbytes > rest) | ((nbytes == 0) & (sizes != 0))
        bad[:-1] |= nbytes[:-1] != rest[:-1]
        if bad.any():
            k = int(np.argmax(bad))
            want_start = done if k == 0 else 0
            raise ProtocolError(
                f"BUCKET {msg.seq}: tensor {names[first + k][:80]!r}: expected its bytes from offset {want_start} on "
                f"{'to its end ' if k < n - 1 else ''}(of {self.fulls[first + k]}), got a {int(nbytes[k])}-byte piece "
                f"at {int(chunks[k])} (duplicate, missing or out-of-order piece)"
            )
        last_done = int(chunks[-1] + nbytes[-1])
        if last_done == self.fulls[end - 1]:
            self._cursor, self._cursor_bytes = end, 0
        else:
            self._cursor, self._cursor_bytes = end - 1, last_done
        return first

    def _advance_whole(self, msg: m.Bucket) -> int:
        """``_advance`` for a packed bucket: whole tensors by construction, so it only has to
        start at the next tensor (packed_entries checked that they exist)."""
        first = self._cursor
        if msg.first != first or self._cursor_bytes:
            want = f"{first} ({self.names[first][:80]!r})" if first < len(self.names) else f"{first} (the end)"
            if self._cursor_bytes:
                want += f" from byte {self._cursor_bytes} (its first chunks came already)"
            raise ProtocolError(
                f"BUCKET {msg.seq}: field 'first': expected manifest index {want}, got {msg.first} with count={msg.count} "
                "whole tensors (buckets carry the BEGIN manifest in order; duplicate, missing or out-of-order bucket)"
            )
        self._cursor = first + (msg.count or 0)
        return first

    def _entry(self, slot: ImportedSlot, index: int, offset: int, nbytes: int, chunk: int) -> tuple[str, Any, int]:
        name = self.names[index]
        data = slot.raw(offset, nbytes)
        if chunk or nbytes != self.fulls[index]:
            return name, data, chunk
        return name, self._view(slot, data, self.dtypes[index], self.shapes[index]), -1

    def _view(self, slot: ImportedSlot, data: Any, code: int, shape: tuple[int, ...]) -> Any:
        framework = self.framework
        if slot.domain == "host" and framework == "numpy":  # the hot path for many small tensors: a plain view
            return data.view(_NUMPY_DTYPES[code]).reshape(shape)
        if slot.domain == "host" and framework == "torch":  # same for torch: ints of the same width, reinterpreted
            as_ints, target = _torch_view_table()[code]
            tensor = _from_numpy(data.view(as_ints).reshape(shape))
            return tensor if target is None else tensor.view(target)
        return slot.typed(framework, data, DTYPES[code], tuple(shape))

    # --- consumer side -----------------------------------------------------------------

    def iterate(self) -> Iterator[tuple[str, Any]]:
        # this run's ties, from the model as it is now (a reused manifest keeps the last run's
        # targets until the model's specs object changes): before any bucket, chunk pieces included
        self._ties = {}
        if self.direct and self._destination is not None:
            self.manifest.targets(self._destination, self._targets_owner)
            self._ties = self.manifest.tie_of
        for _ in range(self.num_buckets):
            bucket: PreparedBucket = self.queue.get(self.timeout)
            if bucket.checksum is not None:
                got = bucket.mapping.digest(bucket.used)
                if got != bucket.checksum:  # checked before any byte of the bucket is applied
                    raise VersionAborted(
                        f"bucket {bucket.seq} of {self.version!r} failed its checksum (expected {bucket.checksum:#018x}, "
                        f"got {got:#018x}): the slot was overwritten or corrupted in transit; the version was not committed"
                    )
            if bucket.streamed:
                yield from self._apply_streamed(bucket)
                self._on_ack(bucket.seq, bucket.slot)
                continue
            if bucket.whole is not None:
                yield from self._apply_whole(bucket)
            linked = self.manifest.aliases_of or self._ties
            for name, data, chunk in bucket.entries:
                if chunk >= 0:
                    data = self._write_piece(bucket.mapping, name, data, chunk)
                    if data is None:  # held in scratch until complete, or written in place
                        done = self._in_place_done
                        if done is not None and linked:
                            self._in_place_done = None
                            yield from self._alias_deliveries(bucket.mapping, *done)
                        continue
                if linked:
                    index = self._index_of(name)
                    if index in self._ties:
                        self._check_tie(index, self._bytes_of(data))
                        self.applied += 1
                        continue
                if not self.staged:
                    self.touched = True  # load_weights gets it: the model may change from here on
                self.last_given = name
                yield name, data
                self.applied += 1
                if linked and index in self.manifest.aliases_of:
                    yield from self._alias_deliveries(bucket.mapping, index, self._bytes_of(data), data)
            bucket.mapping.sync()  # e.g. a CUDA stream sync: copies out of the slot must be complete
            if bucket.checksum is not None:
                self._check_unchanged(bucket)
            self._on_ack(bucket.seq, bucket.slot)
        self.finished = True

    def _check_unchanged(self, bucket: PreparedBucket) -> None:
        """The digest again, once the consumer moved past the bucket and before its ACK: the
        first check covers what arrived, this one what was copied out (a writer that changed
        the slot between the two would otherwise commit corrupt tensors as intact)."""
        got = bucket.mapping.digest(bucket.used)
        if got != bucket.checksum:
            raise VersionAborted(
                f"bucket {bucket.seq} of {self.version!r} changed while it was being applied (checksum "
                f"{bucket.checksum:#018x} before, {got:#018x} after): something wrote into the slot before this "
                "rank acked it, so what was copied may be corrupt; the version was not committed. Look for another "
                "process writing into the sender's slots"
            )

    # --- tied weights -------------------------------------------------------------------

    def _index_of(self, name: str) -> int:
        if not self._index:
            self._index = {n: i for i, n in enumerate(self.names)}
        return self._index[name]

    @staticmethod
    def _bytes_of(data: Any) -> np.ndarray:
        """A yielded tensor's bytes as flat uint8 (host memory)."""
        found = bytes_view(data)
        return found if found is not None else host_bytes(data)

    def _alias_dest(self, name: str, full: int) -> np.ndarray | None:
        """Where an alias's bytes go in this rank's model (None: it gets a view instead)."""
        if name not in self._alias_dests:
            dest = None
            if self._destination is not None and not self.staged:
                found = self._destination(name)
                if found is not None and found.nbytes == full and found.dtype == np.uint8:
                    dest = found
            self._alias_dests[name] = dest
        return self._alias_dests[name]

    def _alias_deliveries(
        self, slot: ImportedSlot, index: int, raw: np.ndarray, view: Any = None
    ) -> Iterator[tuple[str, Any]]:
        """The sender's aliases of tensor ``index`` (its bytes ``raw``): a model that ties them to
        the same memory needs nothing more; one that has a separate place gets a copy; otherwise
        load_weights gets the tensor again under the alias's name."""
        full = self.fulls[index]
        primary = self._alias_dest(self.names[index], full) if self.direct else None
        for alias in self.manifest.aliases_of.get(index, ()):
            dest = self._alias_dest(alias, full)
            if dest is not None and slot.domain == "host":
                if primary is None or address_of(dest) != address_of(primary):
                    np.copyto(dest, raw)
                continue
            self.last_given = alias
            yield alias, view if view is not None else self._view(slot, raw, self.dtypes[index], self.shapes[index])

    def _check_tie(self, index: int, raw: np.ndarray) -> None:
        """Tensor ``index`` shares its memory with ``tie_of[index]`` in this model but came apart:
        one write is enough if the bytes agree; different values cannot both be served."""
        twin = self._ties[index]
        dest = self._alias_dest(self.names[twin], self.fulls[twin])
        if dest is None or np.array_equal(dest, raw):
            return
        raise ManifestMismatch(
            f"tensors {self.names[twin]!r} and {self.names[index]!r} are one tensor in this rank's model (tied "
            "weights) but the trainer sent them with different values; fix: tie them in the trainer too (send one, "
            "or the same tensor under both names), or untie them in the inference model"
        )

    def _apply_whole(self, bucket: PreparedBucket) -> Iterator[tuple[str, Any]]:
        """Direct mode: copy whole tensors into their destinations; yield only those without one."""
        first, offsets = bucket.whole  # type: ignore[misc]
        end = first + len(offsets)
        targets, addresses = self.manifest.targets(self._destination, self._targets_owner)  # type: ignore[arg-type]
        slot = bucket.mapping
        raw = slot.raw(0, slot.size)
        mv = memoryview(raw)
        self.touched = True  # the model's own memory is written from here on
        count, names, fulls = end - first, self.names, self.fulls
        stream = slot.streams
        # C: every target with an address, the GIL released over the whole run; without the C
        # module (no addresses) the loop below takes every tensor
        spans = None if addresses is None else (offsets, self.manifest.sizes[first:end], addresses[first:end])
        k = 0 if spans is None else speedups.scatter(raw, *spans, 0, stream)
        while k < count:
            index = first + k
            target, offset, n = targets[index], int(offsets[k]), fulls[index]
            if type(target) is memoryview:  # small: per-tensor overhead dominates, a memoryview copy is the cheapest
                target[:] = mv[offset : offset + n]
            elif target is not None:  # NumPy releases the GIL for big copies, so the daemon's loop keeps running
                np.copyto(target, raw[offset : offset + n])
            elif index in self._ties:  # tied here, sent apart: the first one's bytes must match
                self._check_tie(index, raw[offset : offset + n])
            else:  # no place to write it: load_weights gets a view
                self.last_given = names[index]
                yield names[index], self._view(slot, raw[offset : offset + n], self.dtypes[index], self.shapes[index])
            k = k + 1 if spans is None else speedups.scatter(raw, *spans, k + 1, stream)
        self.applied += end - first
        aliased = self.manifest.aliases_of
        if aliased:  # the sender's aliases of this bucket's tensors, from the bytes just written
            for index in sorted(i for i in aliased if first <= i < end):
                offset = int(offsets[index - first])
                yield from self._alias_deliveries(slot, index, raw[offset : offset + fulls[index]])

    def _apply_streamed(self, bucket: PreparedBucket) -> Iterator[tuple[str, Any]]:
        """A streamed bucket, in offset order: the chunk piece it may start with, the whole tensors
        (each straight to its address), the chunk piece it may end with. Only a chunked tensor
        completed in scratch is yielded (a private copy, not the slot's stream)."""
        read = bucket.mapping.stream_reader(self.stream_index, bucket.used, self.check, self.timeout)
        slot, spans = bucket.mapping, bucket.spans or []
        pieces = list(zip(bucket.entries, spans))

        def piece(k: int) -> Iterator[tuple[str, Any]]:
            (name, _, chunk), (offset, nbytes) = pieces[k]
            data = self._write_piece(slot, name, None, chunk, (read, offset, nbytes))
            if data is not None:
                self.touched = True
                self.last_given = name
                yield name, data
                self.applied += 1

        for k in range(bucket.head):
            yield from piece(k)
        if bucket.whole is not None:
            first, offsets = bucket.whole
            end = first + len(offsets)
            targets, addresses = self.manifest.targets(self._destination, self._targets_owner)  # type: ignore[arg-type]
            if addresses is None:
                raise VersionAborted("a streamed bucket came but this rank has no destination addresses (no C module)")
            self.touched = True  # the model's own memory is written from here on
            k = read.scatter(offsets, self.manifest.sizes[first:end], addresses[first:end], 0, len(offsets), slot.streams)
            if k < len(offsets):
                raise VersionAborted(
                    f"tensor {self.names[first + k]!r} has no place to be written, yet this rank took "
                    f"{self.version!r} streamed; the version was aborted"
                )
            self.applied += end - first
        for k in range(bucket.head, len(pieces)):
            yield from piece(k)
        read.consume(bucket.used)

    def _write_piece(
        self, slot: ImportedSlot, name: str, data: Any, chunk: int, ring: tuple[StreamRead, int, int] | None = None
    ) -> Any | None:
        """Write a chunk into its destination; return a view to yield once complete. From a
        streamed bucket, ``ring`` is (the read, the piece's offset, its bytes) and ``data`` is None."""
        if not self._index:
            self._index = {n: i for i, n in enumerate(self.names)}
        index = self._index[name]
        code, shape, full = self.dtypes[index], self.shapes[index], self.fulls[index]
        held = self._partial.get(name)
        if held is None:
            usable = (
                self._destination is not None and slot.domain == "host" and not self.staged
                and index not in self._ties  # compared with its twin once complete, never written
            )
            dest = self._destination(name) if usable else None
            if dest is not None and dest.nbytes == full and dest.dtype == np.uint8:
                held = (dest, True)  # the model's own memory: no full-size temporary
            else:
                held = (slot.scratch(full), False)
            self._partial[name] = held
        buf, in_place = held
        if in_place:
            self.touched = True  # the model's own memory is written from here on
        if ring is None:
            slot.copy(buf, chunk, data)
            end = chunk + data.nbytes
        else:
            read, offset, nbytes = ring
            read.copy_out(buf, chunk, offset, nbytes, slot.streams and in_place)
            end = chunk + nbytes
        if end < full:
            return None
        del self._partial[name]
        if in_place:
            self.applied += 1
            self._in_place_done = (index, buf)  # its aliases, if any, are delivered from the model's bytes
            return None
        return slot.typed(self.framework, buf, DTYPES[code], tuple(shape))

    @property
    def complete(self) -> bool:
        return self.finished and self.applied == self.total_tensors
