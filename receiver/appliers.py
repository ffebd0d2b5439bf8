"""How a version's buckets reach the model, chosen once per version at BEGIN.

- :class:`Views`: every tensor goes to ``load_weights`` as a typed zero-copy view of the slot
  (chunked tensors are assembled first, in the model's memory or in scratch).
- :class:`Direct`: the sink says where each tensor's bytes live and the manifest was checked
  against it, so whole tensors are copied from the slot straight into the model's memory (the
  C scatter, GIL released); only what has no place goes to ``load_weights``.
- :class:`Streamed`: :class:`Direct`, and a bucket the sender streams (BUCKET ``ring``) is read
  through the slot's stream reader while the sender writes it.

Each splits a bucket on the daemon's loop (``prepare``, after :class:`~.version_run.VersionRun`
checked that it continues the manifest) and applies it on the apply thread (``apply``, a
generator of what ``load_weights`` gets).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import native as speedups
from ..protocol import messages as m
from ..protocol.errors import ProtocolError, VersionAborted
from ..protocol.transports import ImportedSlot

if TYPE_CHECKING:
    from .version_run import VersionRun


@dataclass
class PreparedBucket:
    seq: int
    slot: int
    mapping: ImportedSlot
    checksum: int | None
    used: int  # end of the last piece in the slot: the checksummed range
    # (name, typed view, -1) for a whole tensor; (name, raw uint8 piece, byte offset) for a chunk
    entries: list[tuple[str, Any, int]]
    # direct: the whole tensors, as (manifest index of the first, their slot offsets as int64);
    # the rest (chunk pieces) stay in ``entries``
    whole: tuple[int, np.ndarray] | None = None
    # a streamed bucket (read as the sender writes it): the entries' (offset, nbytes) in the slot,
    # and how many entries come before the whole tensors (all of it is read in offset order)
    streamed: bool = False
    spans: list[tuple[int, int]] | None = None
    head: int = 0
    # every piece's (slot offsets, sizes): what a network transport receives (Capabilities.receives)
    pieces: tuple[np.ndarray, np.ndarray] | None = None
    # direct: which of ``whole`` a network transport received straight into the model (not copied again)
    landed: np.ndarray | None = None
    # views mode, a bucket of whole host tensors: what load_weights gets, as batches of (names,
    # their views), each view made only when the consumer takes it (``entries`` is then empty)
    batches: list[tuple[list[str], Any]] | None = None


class Views:
    def __init__(self, run: VersionRun) -> None:
        self.run = run

    def check(self, msg: m.Bucket, slot: ImportedSlot) -> None:
        """Refuse a BUCKET this applier cannot take, before it counts in the version's order."""
        if msg.ring:
            raise ProtocolError(
                f"BUCKET {msg.seq}: field 'ring': expected none, since this rank did not offer to take "
                f"{self.run.version!r} streamed (READY streamed), got ring=True"
            )

    def prepare(
        self, msg: m.Bucket, slot: ImportedSlot, first: int, offsets: np.ndarray, nbytes: np.ndarray,
        chunks: np.ndarray, used: int,
    ) -> PreparedBucket:
        run = self.run
        batches = run.batch_views(slot, first, offsets, nbytes, chunks, used)
        if batches is not None:
            return PreparedBucket(msg.seq, msg.slot, slot, msg.checksum, used, [], batches=batches)
        entry = run.entry
        pieces = zip(range(first, first + len(offsets)), offsets.tolist(), nbytes.tolist(), chunks.tolist())
        return PreparedBucket(msg.seq, msg.slot, slot, msg.checksum, used, [entry(slot, *piece) for piece in pieces])

    def apply(self, bucket: PreparedBucket) -> Iterator[tuple[str, Any]]:
        return self.run.deliver(bucket)


class Direct(Views):
    def prepare(
        self, msg: m.Bucket, slot: ImportedSlot, first: int, offsets: np.ndarray, nbytes: np.ndarray,
        chunks: np.ndarray, used: int,
    ) -> PreparedBucket:
        lo, hi = self._whole_range(first, nbytes, chunks)
        run = self.run
        entries = [run.entry(slot, first + k, int(offsets[k]), int(nbytes[k]), int(chunks[k])) for k in (*range(lo), *range(hi, len(offsets)))]
        whole = (first + lo, offsets[lo:hi]) if hi > lo else None
        return PreparedBucket(msg.seq, msg.slot, slot, msg.checksum, used, entries, whole)

    def _whole_range(self, first: int, nbytes: np.ndarray, chunks: np.ndarray) -> tuple[int, int]:
        """Only the first and the last entry can be chunk pieces: [lo, hi) are the whole tensors between."""
        fulls, lo, hi = self.run.fulls, 0, len(nbytes)
        if hi and (chunks[0] or nbytes[0] != fulls[first]):
            lo = 1
        if hi > lo and (chunks[hi - 1] or nbytes[hi - 1] != fulls[first + hi - 1]):
            hi -= 1
        return lo, hi

    def apply(self, bucket: PreparedBucket) -> Iterator[tuple[str, Any]]:
        if bucket.whole is not None:
            yield from self._apply_whole(bucket)
        yield from self.run.deliver(bucket)

    def _apply_whole(self, bucket: PreparedBucket) -> Iterator[tuple[str, Any]]:
        """Copy whole tensors into their destinations; yield only those without one."""
        run = self.run
        first, offsets = bucket.whole  # type: ignore[misc]
        end = first + len(offsets)
        targets, addresses = run.targets()
        slot = bucket.mapping
        raw = slot.raw(0, bucket.used)  # every piece of the bucket lies below its end
        mv = memoryview(raw)
        run.touched = True  # the model's own memory is written from here on
        count, names, fulls, ties = end - first, run.names, run.fulls, run.ties
        stream = slot.streams
        landed = bucket.landed  # received straight into the model: nothing to copy (address 0 stops the C copy)
        # C: every target with an address, the GIL released over the whole run; without the C
        # module (no addresses) the loop below takes every tensor
        spans = None if addresses is None else (
            offsets, run.manifest.sizes[first:end],
            addresses[first:end] if landed is None or not landed.any() else np.where(landed, 0, addresses[first:end]),
        )
        k = 0 if spans is None else speedups.scatter(raw, *spans, 0, stream)
        while k < count:
            if landed is not None and landed[k]:
                k = k + 1 if spans is None else speedups.scatter(raw, *spans, k + 1, stream)
                continue
            index = first + k
            target, offset, n = targets[index], int(offsets[k]), fulls[index]
            if type(target) is memoryview:  # small: per-tensor overhead dominates, a memoryview copy is the cheapest
                target[:] = mv[offset : offset + n]
            elif target is not None:  # NumPy releases the GIL for big copies, so the daemon's loop keeps running
                np.copyto(target, raw[offset : offset + n])
            elif index in ties:  # tied here, sent apart: the first one's bytes must match
                run.check_tie(index, raw[offset : offset + n])
            else:  # no place to write it: load_weights gets a view
                run.last_given = names[index]
                yield names[index], run.view(slot, raw[offset : offset + n], run.dtypes[index], run.shapes[index])
            k = k + 1 if spans is None else speedups.scatter(raw, *spans, k + 1, stream)
        run.applied += end - first
        aliased = run.manifest.aliases_of
        if aliased:  # the sender's aliases of this bucket's tensors, from the bytes just written
            for index in sorted(i for i in aliased if first <= i < end):
                offset = int(offsets[index - first])
                yield from run.alias_deliveries(slot, index, raw[offset : offset + fulls[index]])


class Streamed(Direct):
    def check(self, msg: m.Bucket, slot: ImportedSlot) -> None:
        if not msg.ring:  # another rank of this push takes it whole: the sender streams nothing
            return
        if not slot.can_stream:
            raise ProtocolError(f"BUCKET {msg.seq}: field 'ring': slot {msg.slot} takes no streamed buckets")
        if msg.checksum is not None:
            raise ProtocolError(f"BUCKET {msg.seq}: fields 'ring' and 'checksum': a streamed bucket cannot be checksummed")

    def prepare(
        self, msg: m.Bucket, slot: ImportedSlot, first: int, offsets: np.ndarray, nbytes: np.ndarray,
        chunks: np.ndarray, used: int,
    ) -> PreparedBucket:
        if not msg.ring:
            return super().prepare(msg, slot, first, offsets, nbytes, chunks, used)
        lo, hi = self._whole_range(first, nbytes, chunks)
        # only chunk pieces and whole tensors with an address (the rank said so at READY)
        ends = (*range(lo), *range(hi, len(offsets)))
        entries = [(self.run.names[first + k], None, int(chunks[k])) for k in ends]
        spans = [(int(offsets[k]), int(nbytes[k])) for k in ends]
        whole = (first + lo, offsets[lo:hi]) if hi > lo else None
        return PreparedBucket(msg.seq, msg.slot, slot, None, used, entries, whole, True, spans, lo)

    def apply(self, bucket: PreparedBucket) -> Iterator[tuple[str, Any]]:
        if bucket.streamed:
            return self._apply_streamed(bucket)
        return super().apply(bucket)

    def _apply_streamed(self, bucket: PreparedBucket) -> Iterator[tuple[str, Any]]:
        """In offset order: the chunk piece it may start with, the whole tensors (each straight to
        its address), the chunk piece it may end with. Only a chunked tensor completed in scratch
        is yielded (a private copy, not the slot's stream)."""
        run = self.run
        read = bucket.mapping.stream_reader(run.stream_index, bucket.used, run.check, run.timeout)
        slot, spans = bucket.mapping, bucket.spans or []
        pieces = list(zip(bucket.entries, spans))

        def piece(k: int) -> Iterator[tuple[str, Any]]:
            (name, _, chunk), (offset, nbytes) = pieces[k]
            data = run.write_piece(slot, name, None, chunk, (read, offset, nbytes))
            if data is not None:
                run.touched = True
                run.last_given = name
                yield name, data
                run.applied += 1

        for k in range(bucket.head):
            yield from piece(k)
        if bucket.whole is not None:
            first, offsets = bucket.whole
            end = first + len(offsets)
            _, addresses = run.targets()
            if addresses is None:
                raise VersionAborted("a streamed bucket came but this rank has no destination addresses (no C module)")
            run.touched = True  # the model's own memory is written from here on
            k = read.scatter(offsets, run.manifest.sizes[first:end], addresses[first:end], 0, len(offsets), slot.streams)
            if k < len(offsets):
                raise VersionAborted(
                    f"tensor {run.names[first + k]!r} has no place to be written, yet this rank took "
                    f"{run.version!r} streamed; the version was aborted"
                )
            run.applied += end - first
        for k in range(bucket.head, len(pieces)):
            yield from piece(k)
        read.consume(bucket.used)


Applier = Views  # the interface: prepare + apply


def choose_applier(run: VersionRun, *, direct: bool, streamed: bool) -> Applier:
    """Once per version: streamed implies direct (a rank streams only what it copies itself)."""
    if direct and streamed:
        return Streamed(run)
    if direct:
        return Direct(run)
    return Views(run)
