"""The stable dtype table: the integer codes that travel on the wire.

Codes are part of the protocol: never renumber or reuse one, only append.
bfloat16 and float8 live in NumPy through ``ml_dtypes``. This module knows our codes,
names, itemsizes and their NumPy dtypes only: what torch and paddle call them lives in
``weightstream.frameworks`` (one module per framework), so the wire codec never pulls
a framework in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from .errors import ProtocolError, WeightstreamError


@dataclass(frozen=True, slots=True)
class DType:
    """One row of the table; ``name`` is the canonical name (NumPy/torch/paddle spelling)."""

    code: int
    name: str
    itemsize: int

    @property
    def numpy(self) -> np.dtype:
        return _NUMPY[self.code]


DTYPES: tuple[DType, ...] = (
    DType(0, "bool", 1),
    DType(1, "uint8", 1),
    DType(2, "int8", 1),
    DType(3, "int16", 2),
    DType(4, "int32", 4),
    DType(5, "int64", 8),
    DType(6, "float16", 2),
    DType(7, "bfloat16", 2),
    DType(8, "float32", 4),
    DType(9, "float64", 8),
    DType(10, "float8_e4m3fn", 1),
    DType(11, "float8_e5m2", 1),
)

_NUMPY: tuple[np.dtype, ...] = (
    np.dtype(np.bool_),
    np.dtype(np.uint8),
    np.dtype(np.int8),
    np.dtype(np.int16),
    np.dtype(np.int32),
    np.dtype(np.int64),
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(ml_dtypes.float8_e4m3fn),
    np.dtype(ml_dtypes.float8_e5m2),
)

_BY_NAME: dict[str, DType] = {d.name: d for d in DTYPES}

#: NumPy dtype -> DType. Keyed by np.dtype (hashes equal for equal dtypes, any byte order
#: spelling of the native order), so ``BY_NUMPY.get(arr.dtype)`` is one dict lookup.
BY_NUMPY: dict[np.dtype, DType] = {_NUMPY[d.code]: d for d in DTYPES}

#: itemsize -> the same-width integer every reinterpretation of bytes goes through, in
#: every framework (``weightstream.frameworks`` module doc says why). The one such table.
INT_OF_ITEMSIZE: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int16), 4: np.dtype(np.int32), 8: np.dtype(np.int64)
}


def _names() -> str:
    return ", ".join(d.name for d in DTYPES)


def by_code(code: int) -> DType:
    """The dtype of a wire code; a ProtocolError for anything outside the table."""
    if type(code) is not int or not 0 <= code < len(DTYPES):
        raise ProtocolError(
            f"dtype code: expected an int in 0..{len(DTYPES) - 1}, got {code!r}; "
            "fix: the peer speaks a newer/different dtype table — upgrade both sides to the same weightstream"
        )
    return DTYPES[code]


def by_name(name: str) -> DType:
    """The dtype of a canonical name (``"bfloat16"``, ``"float8_e4m3fn"``, ...)."""
    found = _BY_NAME.get(name)
    if found is None:
        raise WeightstreamError(f"dtype: expected one of {_names()}; got {name!r}; fix: use a canonical name")
    return found


def unsupported(what: Any) -> WeightstreamError:
    """The error for a dtype outside the table (any framework's), listing the supported ones."""
    return WeightstreamError(
        f"dtype {what} is not supported by weightstream; supported: {_names()}; "
        "fix: cast the tensor to a supported dtype before sending"
    )


def from_numpy(dtype: Any) -> DType:
    """DType of a NumPy dtype (anything ``np.dtype()`` accepts)."""
    found = BY_NUMPY.get(np.dtype(dtype))
    if found is None:
        raise unsupported(np.dtype(dtype))
    return found
