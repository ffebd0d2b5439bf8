"""What weightstream knows of NumPy arrays (the interface in ``_api.FrameworkModule``).

NumPy holds every wire dtype (bfloat16 and float8 through ``ml_dtypes``), lives on the host
only, and its arrays always hold data: the device functions say so by returning None or
raising, the materialisation checks always pass.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from ..protocol.dtypes import BY_NUMPY, DTYPES, DType, from_numpy
from ._api import CudaSource, DeviceMemory, Framework, not_cuda_tensor, rows

NAME: Framework = "numpy"

_NUMPY = tuple(d.numpy for d in DTYPES)  # by wire code: one tuple index on the view hot path
_CODES: dict[Any, int] = {dt: d.code for dt, d in BY_NUMPY.items()}


def imported() -> bool:
    """Whether numpy is imported in this process (none of its objects can exist before)."""
    return True  # imported by weightstream itself


def owns(obj: Any) -> bool:
    return isinstance(obj, (np.ndarray, np.generic))


def is_model(obj: Any) -> bool:
    return False  # a dict of arrays is a model for NumpySink, but no NumPy type is one


def native_dtype(dtype: DType) -> np.dtype:
    return _NUMPY[dtype.code]


def wire_dtype(native: Any) -> DType:
    return from_numpy(native)


def dtype_of(tensor: Any) -> DType:
    return from_numpy(tensor.dtype)


def codes_by_dtype() -> dict[Any, int]:
    """Wire dtype codes keyed by NumPy dtype (shared: do not modify)."""
    return _CODES


def shape_of(tensor: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in tensor.shape)


def device_of(tensor: Any) -> str:
    return "cpu"


def is_materialised(tensor: Any) -> bool:
    return True


def check_sendable(tensor: Any) -> None:
    return None  # every array holds its data


def memory_key(tensor: Any) -> Hashable | None:
    """Equal for arrays over the same memory with the same dtype, shape and strides (aliases);
    None for an empty array or anything but a plain ndarray."""
    if type(tensor) is not np.ndarray or not tensor.size:
        return None
    return ("numpy", tensor.__array_interface__["data"][0], tensor.dtype.str, tensor.shape, tensor.strides)


def unmaterialised(model: Any) -> list[str]:
    return []


def host_bytes(tensor: Any) -> np.ndarray:
    """A 1-D uint8 array over the array's bytes in C order: zero-copy when C-contiguous, else
    one copy. A read-only input gives a read-only result."""
    dtype_of(tensor)  # reject unsupported dtypes, with the list of supported ones
    return np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)


def bytes_view(tensor: Any) -> np.ndarray | None:
    """A writable zero-copy 1-D uint8 view of the array's bytes; None if not C-contiguous or read-only."""
    if not isinstance(tensor, np.ndarray) or not tensor.flags.c_contiguous or not tensor.flags.writeable:
        return None
    return tensor.reshape(-1).view(np.uint8)


def view(buf: np.ndarray, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
    """A typed view over ``buf`` (1-D uint8, ``prod(shape) * itemsize`` bytes); nothing checked."""
    return buf.view(_NUMPY[dtype.code]).reshape(shape)


def views(buf: np.ndarray, dtype: DType, shape: tuple[int, ...], count: int, offset: int, stride: int) -> Any:
    """``count`` typed views of ``shape`` over ``buf`` (1-D uint8), the first at byte ``offset``,
    each ``stride`` bytes after the last: :func:`view` of each, made in one batch; nothing checked."""
    return rows(buf, _NUMPY[dtype.code], shape, count, offset, stride)


def retype(flat: Any, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
    """A typed view over a flat 1-D uint8 array of this framework (for NumPy: :func:`view`)."""
    return view(flat, dtype, shape)


def detached_copy(tensor: Any) -> Any:
    return tensor.copy()


def to_host(tensor: Any) -> Any:
    return tensor


def device_view(buf: DeviceMemory, dtype: DType, shape: tuple[int, ...]) -> Any | None:
    """None: NumPy cannot view GPU memory; copy it into :func:`empty_bytes` and :func:`retype`."""
    return None


def empty_bytes(nbytes: int, device: int | None) -> np.ndarray:
    """A new 1-D uint8 array of ``nbytes`` on the host (where every NumPy array lives, whatever ``device``)."""
    return np.empty(nbytes, dtype=np.uint8)


def data_ptr(tensor: Any) -> int:
    return int(tensor.__array_interface__["data"][0])


def cuda_source(tensor: Any) -> CudaSource:
    raise not_cuda_tensor(tensor)


def sync_device(device: int) -> None:
    return None  # NumPy never reads device memory
