"""Packing one bucket: copying its tensors, or pieces of them, through the bucket's writer.

Whole buckets of whole tensors are copied in bulk (the C gather); a bucket with a chunk piece,
and every bucket of a lazy push, piece by piece, each tensor converted once and, in lazy mode,
pulled from the trainer's generator only when packing reaches it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..protocol.errors import WeightstreamError
from ..protocol.transports import BucketWriter
from .manifest import Manifest, pull


def fill(bucket: Any, writer: BucketWriter, cache: PieceCache) -> None:
    """Copy a planned bucket's tensors, or pieces of them, through its ``writer``."""
    manifest = cache.manifest
    # The planner lays tensors out in order, so a bucket holds a contiguous run of them.
    first, last = bucket.tensors[0], bucket.tensors[-1] + 1
    if bucket.whole and cache.source is None and manifest.tensors is not None:  # no chunk: each tensor once, in bulk
        try:
            changed = writer.write_whole(bucket, cache.items())
            if changed is not None:
                raise changed_error(manifest, changed)
        except Exception as exc:  # a tensor the slot cannot take (on another device, sparse, ...): name it
            raise _named(exc, manifest, writer, range(first, last)) from exc
        return
    for index, offset, nbytes, chunk in zip(bucket.tensors, bucket.offsets, bucket.nbytes, bucket.chunks):
        try:
            data = cache.bytes_of(index, writer)
        except Exception as exc:
            raise _named(exc, manifest, writer, [index]) from exc
        if nbytes:
            writer.write(offset, data, chunk, nbytes)
        del data  # a lazy push's tensor must not outlive its pieces while the next one is pulled


def _named(exc: Exception, manifest: Manifest, slot: Any, indices: Any) -> Exception:
    """``exc`` as a WeightstreamError naming the first of ``indices`` whose bytes the slot cannot
    take (the bulk copy does not say which); ``exc`` itself if it names its tensor already."""
    text = str(exc)
    if isinstance(exc, WeightstreamError) and text.startswith("tensor '"):
        return exc
    culprit = None
    if manifest.tensors is not None:
        for index in indices:
            try:
                slot.source_bytes(manifest.tensors[index])
            except Exception as found:
                culprit, exc, text = index, found, str(found)
                break
    if culprit is None:
        return exc
    what = text.removeprefix("tensor: ")
    kind = type(exc) if isinstance(exc, WeightstreamError) else WeightstreamError
    if not isinstance(exc, WeightstreamError):
        what = f"{type(exc).__name__}: {what}; fix: push a dense, contiguous CPU tensor (e.g. tensor.to_dense().contiguous())"
    return kind(f"tensor {manifest.names[culprit]!r}: {what}")


class PieceCache:
    """The tensor whose pieces are being written: a chunked tensor is converted once, and in lazy
    mode each tensor is pulled from the trainer's generator only when packing reaches it."""

    def __init__(self, manifest: Manifest, source: Iterator[tuple[str, Any]] | None) -> None:
        self.manifest, self.source = manifest, source
        self._index = -1
        self._bytes: Any = None  # the current tensor's host bytes (its slot's source_bytes)
        self._items: tuple[Any, ...] | None = None

    def items(self) -> tuple[Any, ...]:
        """Every tensor of the push, as one tuple (made once: runs index it without slicing)."""
        if self._items is None:
            self._items = tuple(self.manifest.tensors or ())
        return self._items

    def bytes_of(self, index: int, slot: Any) -> Any:
        if index != self._index:
            self._index, self._bytes = -1, None  # the last tensor goes before the next is pulled (a lazy push holds one)
            manifest = self.manifest
            tensor = manifest.tensors[index] if self.source is None else pull(self.source, manifest, index)  # type: ignore[index]
            self._index, self._bytes = index, slot.source_bytes(tensor)
            del tensor  # only the byte view lives on, until the next tensor replaces it
            if self._bytes.nbytes != manifest.nbytes[index]:
                raise changed_error(manifest, index)
        return self._bytes

    def check_end(self, last_bucket: bool) -> None:
        if self.source is not None and last_bucket and next(self.source, None) is not None:
            raise WeightstreamError(
                f"the tensors ran past the {len(self.manifest)} given in specs=; "
                "yield exactly the specs' tensors, in the specs' order"
            )


def changed_error(manifest: Manifest, index: int) -> WeightstreamError:
    return WeightstreamError(
        f"tensor {manifest.names[index]!r} changed while being pushed: expected {manifest.nbytes[index]} bytes; "
        "do not resize params during push"
    )
