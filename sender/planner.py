"""Pure bucket planning: tensor sizes in, bucket layouts out. No I/O, no tensors.

Tensors are packed greedily in the order given (so a trainer can produce them
lazily in that order) at ``alignment``-byte offsets. A tensor that does not fit
in the rest of the current bucket starts a new one; a tensor larger than a whole
bucket is split into chunks that fill successive buckets, so it streams through
the ring without a full-size temporary on either side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..protocol.errors import WeightstreamError


@dataclass
class PlannedBucket:
    """One bucket: parallel arrays, one row per tensor piece."""

    seq: int
    tensors: list[int] = field(default_factory=list)  # index into the input sizes
    offsets: list[int] = field(default_factory=list)  # byte offset inside the slot
    nbytes: list[int] = field(default_factory=list)  # bytes of this piece
    chunks: list[int] = field(default_factory=list)  # byte offset of the piece inside its tensor
    used: int = 0  # end of the last piece, before padding

    def add(self, tensor: int, offset: int, nbytes: int, chunk: int) -> None:
        self.tensors.append(tensor)
        self.offsets.append(offset)
        self.nbytes.append(nbytes)
        self.chunks.append(chunk)
        self.used = offset + nbytes


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def plan_buckets(
    sizes: Sequence[int], bucket_bytes: int, alignment: int = 256, *, allow_chunks: bool = True
) -> list[PlannedBucket]:
    """Lay out tensors of ``sizes`` bytes into buckets of ``bucket_bytes``.

    Returns an empty list for no tensors. Empty tensors take no space but still
    get an entry, so every tensor appears in exactly one bucket (or, when
    chunked, in consecutive buckets whose pieces cover it exactly once).
    """
    if alignment <= 0 or alignment & (alignment - 1):
        raise WeightstreamError(f"alignment must be a power of two, got {alignment}")
    if bucket_bytes < alignment or bucket_bytes % alignment:
        raise WeightstreamError(
            f"bucket_bytes must be a positive multiple of the {alignment}-byte alignment, got {bucket_bytes}; "
            f"use e.g. {max(alignment, align_up(bucket_bytes, alignment))}"
        )
    if sizes and min(sizes) < 0:
        index = next(i for i, size in enumerate(sizes) if size < 0)
        raise WeightstreamError(f"tensor {index}: size must be >= 0, got {sizes[index]}")
    buckets: list[PlannedBucket] = []
    current: PlannedBucket | None = None
    cursor = 0  # next aligned free offset in ``current``
    mask = alignment - 1
    # The loop body for a tensor that fits is kept to a few list appends: at 100k tensors
    # this runs once per tensor per push.
    tensors_, offsets_, nbytes_, chunks_ = [], [], [], []
    for index, size in enumerate(sizes):
        if current is not None and cursor + size <= bucket_bytes:
            tensors_.append(index)
            offsets_.append(cursor)
            nbytes_.append(size)
            chunks_.append(0)
            cursor = (cursor + size + mask) & ~mask
            continue
        if current is not None:
            current.used = offsets_[-1] + nbytes_[-1]
        if size <= bucket_bytes:
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
        if current is not None and cursor < bucket_bytes:
            piece = bucket_bytes - cursor
            current.add(index, cursor, piece, 0)
            done = piece
        while done < size:
            current = PlannedBucket(seq=len(buckets))
            buckets.append(current)
            piece = min(bucket_bytes, size - done)
            current.add(index, 0, piece, done)
            done += piece
        tensors_, offsets_, nbytes_, chunks_ = current.tensors, current.offsets, current.nbytes, current.chunks
        cursor = align_up(current.used, alignment)
    if current is not None:
        current.used = offsets_[-1] + nbytes_[-1]
    return buckets
