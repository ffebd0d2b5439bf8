"""The stable dtype table: the integer codes that travel on the wire.

Codes are part of the protocol: never renumber or reuse one, only append.
bfloat16 and float8 live in NumPy through ``ml_dtypes``. torch and paddle are
imported lazily so that this module (and the wire codec) never pulls them in.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from .errors import ProtocolError, WeightstreamError

if TYPE_CHECKING:
    import paddle
    import torch


@dataclass(frozen=True, slots=True)
class DType:
    """One row of the table; ``name`` is the canonical name (NumPy/torch/paddle spelling)."""

    code: int
    name: str
    itemsize: int

    @property
    def numpy(self) -> np.dtype:
        return _NUMPY[self.code]

    def torch(self) -> torch.dtype:
        import torch

        found = getattr(torch, self.name, None)
        if found is None:
            raise WeightstreamError(
                f"torch {torch.__version__} has no dtype {self.name!r} (weightstream code {self.code}); "
                "fix: upgrade torch (float8 needs torch >= 2.1) or send this tensor in another dtype"
            )
        return found

    def paddle(self) -> paddle.dtype:
        import paddle

        found = getattr(paddle, self.name, None)
        if found is None:
            raise WeightstreamError(
                f"paddle {paddle.__version__} has no dtype {self.name!r} (weightstream code {self.code}); "
                "fix: upgrade paddlepaddle to >= 3.0 or send this tensor in another dtype"
            )
        return found


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

# torch.dtype / paddle.dtype -> DType, built on first use (needs the framework imported).
_BY_TORCH: dict[Any, DType] | None = None
_BY_PADDLE: dict[Any, DType] | None = None


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


def _unsupported(what: Any) -> WeightstreamError:
    return WeightstreamError(
        f"dtype {what} is not supported by weightstream; supported: {_names()}; "
        "fix: cast the tensor to a supported dtype before sending"
    )


def _torch_table() -> dict[Any, DType]:
    global _BY_TORCH
    if _BY_TORCH is None:
        import torch

        _BY_TORCH = {getattr(torch, d.name): d for d in DTYPES if hasattr(torch, d.name)}
    return _BY_TORCH


def _paddle_table() -> dict[Any, DType]:
    global _BY_PADDLE
    if _BY_PADDLE is None:
        import paddle

        _BY_PADDLE = {getattr(paddle, d.name): d for d in DTYPES if hasattr(paddle, d.name)}
    return _BY_PADDLE


def codes_by_torch_dtype() -> dict[Any, int]:
    """Wire dtype codes keyed by torch dtype (imports torch)."""
    return {dt: d.code for dt, d in _torch_table().items()}


def from_torch(dtype: Any) -> DType:
    """DType of a ``torch.dtype``."""
    found = _torch_table().get(dtype)
    if found is None:
        raise _unsupported(dtype)
    return found


def from_paddle(dtype: Any) -> DType:
    """DType of a paddle dtype (``paddle.float32`` or a tensor's ``.dtype``)."""
    found = _paddle_table().get(dtype)
    if found is None:
        raise _unsupported(dtype)
    return found


def from_numpy(dtype: Any) -> DType:
    """DType of a NumPy dtype (anything ``np.dtype()`` accepts)."""
    found = BY_NUMPY.get(np.dtype(dtype))
    if found is None:
        raise _unsupported(np.dtype(dtype))
    return found


def dtype_of(tensor: Any) -> DType:
    """DType of a NumPy array/scalar, torch tensor or paddle tensor."""
    if isinstance(tensor, (np.ndarray, np.generic)):
        return from_numpy(tensor.dtype)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(tensor, torch.Tensor):
        return from_torch(tensor.dtype)
    paddle = sys.modules.get("paddle")
    if paddle is not None and isinstance(tensor, paddle.Tensor):
        return from_paddle(tensor.dtype)
    raise WeightstreamError(
        f"tensor: expected a numpy array, torch tensor or paddle tensor, got {type(tensor).__qualname__}; "
        "fix: convert it to one of those"
    )
