"""weightstream.native._spans (_spans.c): the per-tensor copy loops. Positional arguments only."""

from collections.abc import Sequence
from typing import Any, TypeAlias

from numpy.typing import NDArray
from typing_extensions import Buffer

# Any object exporting a C-contiguous buffer; NumPy's stubs give ndarray ``__buffer__`` on 3.12+ only.
_Bytes: TypeAlias = Buffer | NDArray[Any]

STREAM_SIMD: str  # the streaming copy's stores: "avx2" (32-byte), "sse2" (16-byte) or "none" (memmove)

def gather(
    dst: _Bytes,
    offsets: Sequence[int],
    nbytes: Sequence[int],
    sources: Sequence[object],
    start: int,
    tensor_types: tuple[type, ...] = ...,
    stream: bool = ...,
    stop: int = ...,
    shift: int = ...,
    /,
) -> int: ...
def destinations(targets: Sequence[object], nbytes: Sequence[int], /) -> bytes: ...
def scatter(
    src: _Bytes, offsets: _Bytes, nbytes: _Bytes, addresses: _Bytes, start: int, stream: bool = ..., /
) -> int: ...
def copy(dst: _Bytes, src: _Bytes, stream: bool = ..., /) -> None: ...
def use_numpy(ndarray: type, /) -> None: ...
