"""Pure bucket planning: tensor sizes in, bucket layouts out. No I/O, no tensors.

Tensors are packed greedily in the order given (so a trainer can produce them
lazily in that order) at ``alignment``-byte offsets. A tensor that does not fit
in the rest of the current bucket starts a new one; a tensor larger than a whole
bucket is split into chunks that fill successive buckets, so it streams through
the ring without a full-size temporary on either side.

A bucket also holds at most ``max_entries`` tensors. A bucket is the unit the
pipeline overlaps (the sender packs one while ranks apply another), and for tiny
tensors its cost is per tensor, not per byte: 100k tensors of 4 KiB in 256 MiB
buckets would make two buckets, leaving the ranks idle while the first ~65k are
packed. Capped, the first bucket ships after ~16k. Buckets that go through a
slot's ring are published before they are packed, and take a higher cap.

``ramp``: the ranks wait for the first bucket while the sender packs it, so the first
buckets are smaller: bucket 0 holds at most ``bucket_bytes >> ramp`` bytes and
``max_entries >> ramp`` tensors, each next one 1.5 times the last, until full (a tensor that
fits a whole bucket is never split for it). With 256 MiB buckets the ranks start after 32 MiB
instead of 256. The growth stays below how much faster the sender packs than an engine's
``load_weights`` copies (1.6x on the Intel VM): doubling made the ranks wait 1.6, 2.7 and
4.6 ms for the 2nd to 4th buckets of a 1 GiB push. The slots keep ``bucket_bytes``.

``max_bytes``: no bucket holds more than this many bytes (a tensor that fits a whole bucket is
never split for it either), so that a rank reads each bucket from the cache right after the
sender wrote it (the transport says how much that is: ``hot_bytes`` of its slots).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..protocol.errors import ConfigError, WeightstreamError
from ..protocol.packed import pack_u64


@dataclass
class PlannedBucket:
    """One bucket: parallel arrays, one row per tensor piece."""

    seq: int
    tensors: list[int] = field(default_factory=list)  # index into the input sizes
    offsets: list[int] = field(default_factory=list)  # byte offset inside the slot
    nbytes: list[int] = field(default_factory=list)  # bytes of this piece
    chunks: list[int] = field(default_factory=list)  # byte offset of the piece inside its tensor
    used: int = 0  # end of the last piece, before padding
    # whole tensors only, packed from 0 (protocol.packed.packed_offsets): the BUCKET sends a count
    whole: bool = True
    _packed: tuple[bytes, bytes, bytes] | None = field(default=None, repr=False, compare=False)

    def add(self, tensor: int, offset: int, nbytes: int, chunk: int) -> None:
        self.tensors.append(tensor)
        self.offsets.append(offset)
        self.nbytes.append(nbytes)
        self.chunks.append(chunk)
        self.used = offset + nbytes
        self._packed = None

    def packed(self) -> tuple[bytes, bytes, bytes]:
        """(offsets, nbytes, chunks) as the wire's packed uint64, made once: a sender reuses its
        plan while the layout is unchanged, and packing 16k entries from lists costs ~1 ms."""
        if self._packed is None:
            self._packed = (pack_u64(self.offsets), pack_u64(self.nbytes), pack_u64(self.chunks))
        return self._packed


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


MAX_ENTRIES = 16384  # measured: 100k x 4 KiB pushes ~10% faster than uncapped; 8k was no better
# Through a slot's ring a bucket is published before its bytes are written, so the ranks are not
# idle while it fills and the cap's reason is gone; what remains is a message round per bucket
# (~1.5 ms on 2 cores). Measured: 100k x 4 KiB pushes ~20% faster in 2 buckets than in 7.
RING_MAX_ENTRIES = 65536


RAMP = 3  # the first bucket holds 1/8 of a bucket
RAMP_GROWTH = 1.5  # and each next one 1.5 times the last, until full


def ramp_limits(
    seq: int, bucket_bytes: int, max_entries: int, alignment: int, ramp: int, max_bytes: int = 0
) -> tuple[int, int]:
    """(bytes, tensors) bucket ``seq`` may hold under a ``ramp`` and ``max_bytes`` (see the module's
    docstring)."""
    limit = bucket_bytes if not max_bytes else max(alignment, min(bucket_bytes, max_bytes // alignment * alignment))
    if not ramp or seq >= 2 * ramp:  # 1.5 ** (2 * ramp) > 2 ** ramp: full (and no float overflow later on)
        return limit, max_entries
    share = RAMP_GROWTH**seq / (1 << ramp)
    if share >= 1:
        return limit, max_entries
    return min(limit, max(alignment, int(bucket_bytes * share) // alignment * alignment)), max(1, int(max_entries * share))


def plan_buckets(
    sizes: Sequence[int], bucket_bytes: int, alignment: int = 256, *, allow_chunks: bool = True,
    max_entries: int = MAX_ENTRIES, ramp: int = 0, max_bytes: int = 0,
) -> list[PlannedBucket]:
    """Lay out tensors of ``sizes`` bytes into buckets of ``bucket_bytes``.

    Returns an empty list for no tensors. Empty tensors take no space but still
    get an entry, so every tensor appears in exactly one bucket (or, when
    chunked, in consecutive buckets whose pieces cover it exactly once).
    """
    if alignment <= 0 or alignment & (alignment - 1):
        raise ConfigError(f"alignment must be a power of two, got {alignment}; fix: e.g. alignment=256")
    if bucket_bytes < alignment or bucket_bytes % alignment:
        raise ConfigError(
            f"bucket_bytes must be a positive multiple of the {alignment}-byte alignment, got {bucket_bytes}; "
            f"use e.g. {max(alignment, align_up(bucket_bytes, alignment))}"
        )
    if sizes and min(sizes) < 0:
        index = next(i for i, size in enumerate(sizes) if size < 0)
        raise WeightstreamError(f"tensor {index}: size must be >= 0, got {sizes[index]}")
    if max_entries < 1:
        raise ConfigError(f"max_entries must be >= 1, got {max_entries}")
    if ramp < 0:
        raise ConfigError(f"ramp must be >= 0, got {ramp}")
    if max_bytes < 0:
        raise ConfigError(f"max_bytes must be >= 0 (0: no cap), got {max_bytes}")
    if len(sizes) > _VECTOR_MIN and max(sizes) <= bucket_bytes:
        return _plan_unchunked(sizes, bucket_bytes, alignment, max_entries, ramp, max_bytes)
    buckets: list[PlannedBucket] = []
    current: PlannedBucket | None = None
    cursor = 0  # next aligned free offset in ``current``
    limit, cap = bucket_bytes, max_entries  # the current bucket's, under the ramp
    mask = alignment - 1
    # The loop body for a tensor that fits is kept to a few list appends: at 100k tensors
    # this runs once per tensor per push.
    tensors_: list[int] = []
    offsets_: list[int] = []
    nbytes_: list[int] = []
    chunks_: list[int] = []
    for index, size in enumerate(sizes):
        if current is not None and cursor + size <= limit and len(tensors_) < cap:
            tensors_.append(index)
            offsets_.append(cursor)
            nbytes_.append(size)
            chunks_.append(0)
            cursor = (cursor + size + mask) & ~mask
            continue
        if current is not None:
            current.used = offsets_[-1] + nbytes_[-1]
        if size <= bucket_bytes:
            limit, cap = ramp_limits(len(buckets), bucket_bytes, max_entries, alignment, ramp, max_bytes)
            current = PlannedBucket(seq=len(buckets))
            tensors_, offsets_, nbytes_, chunks_ = current.tensors, current.offsets, current.nbytes, current.chunks
            buckets.append(current)
            current.add(index, 0, size, 0)
            cursor = (size + mask) & ~mask
            continue
        if not allow_chunks:
            raise WeightstreamError(
                f"tensor {index} has {size} bytes, more than bucket_bytes={bucket_bytes}; "
                "raise bucket_bytes or allow chunking"
            )
        # Chunked: use what is left of the current bucket, then whole buckets.
        done = 0
        if current is not None and cursor < limit and len(tensors_) < cap:
            piece = limit - cursor
            current.add(index, cursor, piece, 0)
            current.whole = False
            done = piece
        # At least one whole bucket follows (size > bucket_bytes >= what was left above).
        while True:
            limit, cap = ramp_limits(len(buckets), bucket_bytes, max_entries, alignment, ramp, max_bytes)
            current = PlannedBucket(seq=len(buckets), whole=False)
            buckets.append(current)
            piece = min(limit, size - done)
            current.add(index, 0, piece, done)
            done += piece
            if done >= size:
                break
        tensors_, offsets_, nbytes_, chunks_ = current.tensors, current.offsets, current.nbytes, current.chunks
        cursor = align_up(current.used, alignment)
    if current is not None:
        current.used = offsets_[-1] + nbytes_[-1]
    return buckets


_VECTOR_MIN = 64  # below this the loop is as fast and the arrays are not worth making


def _plan_unchunked(
    sizes: Sequence[int], bucket_bytes: int, alignment: int, max_entries: int, ramp: int, max_bytes: int = 0
) -> list[PlannedBucket]:
    """The same layout as the loop when no tensor needs chunking, at C speed.

    Laid out back to back from 0, tensor j would start at ``starts[j]`` and end at
    ``ends[j]`` (unaligned), and ``ends`` never decreases; so each bucket is the run
    of tensors whose ends lie within ``bucket_bytes`` of the run's first start: one
    binary search per bucket instead of a Python step per tensor; ``max_entries`` then
    cuts the run short.
    """
    size = np.asarray(sizes, dtype=np.int64)
    aligned = (size + (alignment - 1)) & ~(alignment - 1)
    starts = np.cumsum(aligned) - aligned
    ends = starts + size
    buckets: list[PlannedBucket] = []
    first, n = 0, len(size)
    while first < n:
        base = int(starts[first])
        limit, cap = ramp_limits(len(buckets), bucket_bytes, max_entries, alignment, ramp, max_bytes)
        fits = int(np.searchsorted(ends, base + limit, side="right"))  # the first that does not fit
        last = max(min(fits, first + cap), first + 1)  # a tensor larger than a ramp's limit goes whole
        bucket = PlannedBucket(
            seq=len(buckets),
            tensors=list(range(first, last)),
            offsets=(starts[first:last] - base).tolist(),
            nbytes=size[first:last].tolist(),
            chunks=[0] * (last - first),
            used=int(ends[last - 1]) - base,
        )
        buckets.append(bucket)
        first = last
    return buckets
