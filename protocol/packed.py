"""Per-tensor metadata as packed binary arrays: what BEGIN and BUCKET carry per entry.

A 100k-tensor manifest as msgpack lists costs ~100k Python objects to build and
~50 ms to parse on every version; as a few ``bin`` fields of little-endian integers
it is parsed in microseconds and checked with NumPy at C speed. Pure functions, no I/O.

Layouts (all little-endian):
- dtype codes: one byte per tensor;
- shapes: ``ndims`` (one byte per tensor) plus ``dims``, every tensor's dims
  concatenated as uint64;
- offsets, piece sizes, chunk starts: one uint64 per entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain

import numpy as np

U64 = np.dtype("<u8")
_EMPTY = np.zeros(0, np.int64)
_EMPTY.flags.writeable = False
# Sizes are summed and added to offsets in int64; keep every value far from overflow.
MAX_VALUE = (1 << 62) - 1


def pack_u64(values: Iterable[int] | np.ndarray) -> bytes:
    """``values`` as packed little-endian uint64."""
    if isinstance(values, np.ndarray):
        return values.astype(U64, copy=False).tobytes()
    return np.array(values if isinstance(values, (list, tuple)) else list(values), dtype=U64).tobytes()


def u64_array(buf: bytes, hi: int = MAX_VALUE) -> np.ndarray | None:
    """Packed uint64 as a read-only int64 array; None if ``buf`` is not a whole number of
    values or one exceeds ``hi`` (callers name the field in their error)."""
    if len(buf) % 8:
        return None
    if not buf:
        return _EMPTY
    values = np.frombuffer(buf, U64)
    if int(values.max()) > hi:
        return None
    return values.view(np.int64)


def pack_shapes(shapes: Sequence[Sequence[int]]) -> tuple[bytes, bytes]:
    """(ndims, dims) for a list of shapes."""
    ndims = bytes(map(len, shapes))
    count = sum(ndims)
    dims = np.fromiter(chain.from_iterable(shapes), dtype=U64, count=count) if count else np.zeros(0, U64)
    return ndims, dims.tobytes()


def unpack_shapes(ndims: bytes, dims: np.ndarray) -> list[tuple[int, ...]]:
    """The shapes as tuples. Costs one tuple per tensor: only for paths that need shapes."""
    n = len(ndims)
    if n == 0:
        return []
    flat = dims.tolist()
    rank = ndims[0]
    if ndims.count(rank) == n:  # the common case: every tensor has the same rank
        return [()] * n if rank == 0 else list(zip(*[iter(flat)] * rank))
    shapes: list[tuple[int, ...]] = []
    start = 0
    for k in ndims:
        shapes.append(tuple(flat[start : start + k]))
        start += k
    return shapes


def element_counts(ndims: bytes, dims: np.ndarray) -> np.ndarray | None:
    """Elements per tensor as int64; None when one would exceed MAX_VALUE.

    Products are bounded in float64 first, so a hostile shape cannot wrap int64.
    ``dims`` must hold exactly ``sum(ndims)`` values.
    """
    n = len(ndims)
    if n == 0:
        return _EMPTY
    rank = ndims[0]
    if ndims.count(rank) == n:
        if rank == 0:
            return np.ones(n, np.int64)
        grid = dims.reshape(n, rank)
        if float(grid.astype(np.float64).prod(axis=1).max()) > MAX_VALUE:
            return None
        products: np.ndarray = grid.prod(axis=1)  # NumPy types prod(axis=) as Any
        return products
    ranks = np.frombuffer(ndims, np.uint8)
    starts = np.cumsum(ranks, dtype=np.int64) - ranks
    padded = np.append(dims, 1)  # a trailing scalar's start is then in range
    approx = np.multiply.reduceat(padded.astype(np.float64), starts)
    approx[ranks == 0] = 1.0
    if float(approx.max()) > MAX_VALUE:
        return None
    counts = np.multiply.reduceat(padded, starts)
    counts[ranks == 0] = 1  # reduceat gives the next tensor's first dim for an empty segment
    return counts


def packed_offsets(sizes: np.ndarray, alignment: int) -> np.ndarray:
    """Where whole tensors of ``sizes`` bytes lie when packed from offset 0, each at the first
    ``alignment``-byte boundary after the last (an empty one takes no space): a packed BUCKET's
    offsets, which the wire leaves out because both sides derive them. int64, like ``sizes``."""
    aligned = (sizes + (alignment - 1)) & ~(alignment - 1)
    offsets: np.ndarray = np.cumsum(aligned) - aligned
    return offsets
