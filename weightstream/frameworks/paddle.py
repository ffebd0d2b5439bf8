"""What weightstream knows of paddle tensors (the interface in ``_api.FrameworkModule``).

paddle is imported only by functions that make paddle objects from ours (dtypes, views);
the rest get a paddle tensor, so paddle is in ``sys.modules`` already.

Zero-copy paths (paddle 3.x), every reinterpretation through the same-width integer
(``INT_OF_ITEMSIZE``): paddle's ``view(dtype)`` between different itemsizes mis-scales the
storage offset of sliced tensors and rejects empty ones, and NumPy's DLPack import has no
bfloat16/float8.

- tensor -> bytes: ``np.from_dlpack(t.detach().view(int_N))`` then a NumPy flat uint8 view
  (``Tensor.numpy()`` would always copy, and returns uint16/int8 for bf16/fp8). NumPy 1.x
  marks every array it imports by DLPack read-only, and a sink writes into these views: there
  the flat uint8 array is built over ``t.data_ptr()`` through ``__array_interface__``
  (:class:`_TensorMemory`), and keeps the tensor alive as its ``base``.
- bytes -> tensor: ``paddle.from_dlpack(buf.view(int_N).reshape(shape)).view(dtype)``; the
  tensor holds a reference to ``buf`` through the DLPack capsule.
- GPU bytes -> tensor: DLPack from a ``cuda.core`` ``Buffer``. Paddle's own
  ``__cuda_array_interface__`` import is avoided: its deleter releases the exporter's
  reference twice (pybind.cc, ``tensor_from_cuda_array_interface``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Hashable
from typing import Any

import numpy as np

from ..protocol.dtypes import DTYPES, INT_OF_ITEMSIZE, DType
from ..protocol.errors import WeightstreamError
from ._api import CudaSource, DeviceMemory, Framework, NativeDtypes, not_cuda_tensor, not_on_gpu, not_on_host, rows

NAME: Framework = "paddle"

_VIEWS: tuple[tuple[np.dtype, Any], ...] | None = None  # by code: (NumPy int to view as, paddle dtype or None)
_from_dlpack: Any = None


def imported() -> bool:
    """Whether paddle is imported in this process (none of its objects can exist before)."""
    return "paddle" in sys.modules


def owns(obj: Any) -> bool:
    paddle = sys.modules.get("paddle")
    return paddle is not None and isinstance(obj, paddle.Tensor)


def is_model(obj: Any) -> bool:
    paddle = sys.modules.get("paddle")
    return paddle is not None and isinstance(obj, paddle.nn.Layer)


# --- dtypes ------------------------------------------------------------------------------------


_DTYPES = NativeDtypes("paddle", "upgrade paddlepaddle to >= 3.0")
native_dtype = _DTYPES.native_dtype
wire_dtype = _DTYPES.wire_dtype
codes_by_dtype = _DTYPES.codes
_ints = _DTYPES.ints


def dtype_of(tensor: Any) -> DType:
    return wire_dtype(tensor.dtype)


# --- a tensor's facts --------------------------------------------------------------------------


def shape_of(tensor: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in tensor.shape)


def device_of(tensor: Any) -> str:
    """``"cpu"``, ``"gpu:0"``, ... as ``paddle.get_device()`` spells them (``str(place)`` is ``Place(gpu:0)``)."""
    text = str(tensor.place)
    return text[6:-1] if text.startswith("Place(") and text.endswith(")") else text


def is_materialised(tensor: Any) -> bool:
    return bool(tensor._is_initialized())


def check_sendable(tensor: Any) -> None:
    """A tensor with no data of its own cannot be packed: say so before anything moves."""
    if not tensor._is_initialized():
        raise WeightstreamError(
            "expected an initialised paddle tensor, got one without data (e.g. made under paddle.LazyGuard); "
            "fix: initialise it before pushing"
        )


def memory_key(tensor: Any) -> Hashable | None:
    """Equal for tensors over the same memory with the same dtype, shape and strides (tied
    weights); None for an empty or uninitialised tensor."""
    if not math.prod(tensor.shape) or not tensor._is_initialized():
        return None
    return ("paddle", str(tensor.place), tensor.data_ptr(), str(tensor.dtype), tuple(tensor.shape),
            tuple(getattr(tensor, "strides", ())))


def unmaterialised(model: Any) -> list[str]:
    """State-dict names of ``model`` (an ``nn.Layer``) without data (e.g. built under ``paddle.LazyGuard``)."""
    return [n for n, t in model.state_dict().items() if not t._is_initialized()]


# --- host bytes --------------------------------------------------------------------------------


def _bytes_dlpack(t: Any) -> np.ndarray:
    """Flat uint8 view of a contiguous, initialised CPU tensor (no copy); NumPy 2."""
    itype = _ints()[t.element_size()]
    t = t.detach()  # paddle refuses __dlpack__ on tensors that require grad; shares the data
    return np.from_dlpack(t if t.dtype == itype else t.view(itype)).reshape(-1).view(np.uint8)


class _TensorMemory:
    """A CPU tensor's bytes offered to NumPy by ``__array_interface__`` (writable).

    ``np.asarray`` of it is a 1-D uint8 array over the tensor's memory whose ``base`` is this
    object, which holds the tensor: the memory lives as long as the array or any view of it.
    """

    __slots__ = ("__array_interface__", "tensor")

    def __init__(self, tensor: Any, ptr: int, nbytes: int) -> None:
        self.tensor = tensor
        self.__array_interface__ = {"version": 3, "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False)}


def _bytes_pointer(t: Any) -> np.ndarray:
    """Flat uint8 view of a contiguous, initialised CPU tensor (no copy), built over its
    ``data_ptr()``: writable on every NumPy (NumPy 1.x's ``from_dlpack`` is read-only)."""
    nbytes = math.prod(t.shape) * t.element_size()  # t.numel() would be a paddle Tensor
    if not nbytes:
        return np.empty(0, np.uint8)  # nothing to alias; an empty tensor may have no pointer
    return np.asarray(_TensorMemory(t, t.data_ptr(), nbytes))


# NumPy < 2 imports every DLPack array read-only (NumPy 2 only when the producer says so).
# Looked up at call time: tests point it at either implementation.
_bytes = _bytes_dlpack if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else _bytes_pointer


def _check_host(tensor: Any) -> None:
    if not tensor._is_initialized():
        raise WeightstreamError(
            "tensor: expected an initialised paddle tensor, got one without data (e.g. made under paddle.LazyGuard); "
            "fix: initialise it before sending"
        )
    place = tensor.place
    if place.is_gpu_place():
        raise not_on_host(place, 'use transport="cuda_ipc"')


def host_bytes(tensor: Any) -> np.ndarray:
    """A 1-D uint8 array over a CPU tensor's bytes in C order: zero-copy when contiguous on the
    CPU, else one copy. An uninitialised tensor raises WeightstreamError, a GPU one TransportError."""
    dtype_of(tensor)  # reject unsupported dtypes, with the list of supported ones
    _check_host(tensor)
    t = tensor if tensor.place.is_cpu_place() else tensor.cpu()  # pinned/custom device: one copy
    return _bytes(t if t.is_contiguous() else t.contiguous())  # else: the one copy


def bytes_view(tensor: Any) -> np.ndarray | None:
    """A writable zero-copy 1-D uint8 view of a tensor's bytes; None unless contiguous, initialised, on the CPU."""
    if tensor.element_size() not in INT_OF_ITEMSIZE:  # e.g. complex128: not a wire dtype anyway
        return None
    if not tensor._is_initialized() or not tensor.place.is_cpu_place() or not tensor.is_contiguous():
        return None
    return _bytes(tensor)


def _views() -> tuple[tuple[np.dtype, Any], ...]:
    """Per wire code: the NumPy int to view bytes as, and the paddle dtype to reinterpret the
    DLPack import as (None when it already is that dtype)."""
    global _VIEWS, _from_dlpack
    if _VIEWS is None:
        import paddle

        ints = _ints()
        table = []
        for d in DTYPES:
            target = native_dtype(d)
            table.append((INT_OF_ITEMSIZE[d.itemsize], None if ints[d.itemsize] == target else target))
        _from_dlpack = paddle.from_dlpack
        _VIEWS = tuple(table)
    return _VIEWS


def view(buf: np.ndarray, dtype: DType, shape: tuple[int, ...]) -> Any:
    """A paddle tensor over ``buf`` (1-D uint8, ``prod(shape) * itemsize`` bytes, writable), zero-copy;
    nothing checked (``weightstream.frameworks.view_as`` checks)."""
    as_ints, target = (_VIEWS or _views())[dtype.code]
    t = _from_dlpack(buf.view(as_ints).reshape(shape))  # a NumPy view: the shape is free
    return t if target is None else t.view(target)


def views(buf: np.ndarray, dtype: DType, shape: tuple[int, ...], count: int, offset: int, stride: int) -> Any:
    """``count`` paddle tensors of ``shape`` over ``buf`` (1-D uint8, writable), the first at byte
    ``offset``, each ``stride`` bytes after the last: :func:`view` of each, made in one batch (one
    strided DLPack import and ``unbind``: 0.8 us a tensor against 16 us for one import each)."""
    as_ints, target = (_VIEWS or _views())[dtype.code]
    t = _from_dlpack(rows(buf, as_ints, shape, count, offset, stride))
    return sys.modules["paddle"].unbind(t if target is None else t.view(target), 0)


def retype(flat: Any, dtype: DType, shape: tuple[int, ...]) -> Any:
    """A typed view over ``flat``, a 1-D uint8 paddle tensor of ``prod(shape) * itemsize`` bytes
    starting at its allocation's offset 0 (paddle's itemsize-changing view is only safe there)."""
    target = native_dtype(dtype)
    if not math.prod(shape):
        return _empty_like(flat, shape, target)  # paddle's view() rejects empty tensors
    t = flat.view(_ints()[dtype.itemsize]).reshape(list(shape))
    return t if t.dtype == target else t.view(target)


def _empty_like(flat: Any, shape: tuple[int, ...], target: Any) -> Any:
    import paddle

    out = paddle.empty(list(shape), dtype=target)
    return out.cuda(flat.place.gpu_device_id()) if flat.place.is_gpu_place() else out.cpu()


def detached_copy(tensor: Any) -> Any:
    return tensor.clone()


def to_host(tensor: Any) -> Any:
    """A CPU tensor (a GPU one costs one device-to-host copy); uninitialised and CPU tensors as they are."""
    return tensor.cpu() if tensor._is_initialized() and not tensor.place.is_cpu_place() else tensor


# --- device memory -----------------------------------------------------------------------------


def device_view(buf: DeviceMemory, dtype: DType, shape: tuple[int, ...]) -> Any | None:
    """A paddle tensor over GPU memory (``prod(shape) * itemsize`` bytes at ``buf.ptr``), zero-copy
    through ``cuda.core``; None without cuda.core (copy into :func:`empty_bytes`, then :func:`retype`)."""
    import paddle

    target = native_dtype(dtype)
    if buf.nbytes == 0:
        return paddle.empty(list(shape), dtype=target).cuda(buf.device)
    try:
        from cuda.core import Buffer
    except ImportError:
        return None
    flat = paddle.utils.dlpack.from_dlpack(Buffer.from_handle(buf.ptr, buf.nbytes, owner=buf))
    if flat.element_size() != 1 or math.prod(flat.shape) != buf.nbytes:  # not the 1-D byte tensor cuda.core exports
        return None
    if flat.dtype != paddle.uint8:
        flat = flat.view(paddle.uint8)
    return retype(flat, dtype, shape)


def empty_bytes(nbytes: int, device: int | None) -> Any:
    """A new 1-D uint8 tensor of ``nbytes`` on GPU ``device`` (None: the host)."""
    import paddle

    out = paddle.empty([nbytes], dtype=paddle.uint8)
    return out.cpu() if device is None else out.cuda(device)


def data_ptr(tensor: Any) -> int:
    return int(tensor.data_ptr())


def cuda_source(tensor: Any) -> CudaSource:
    """A GPU tensor's bytes (one copy, on its current stream, if not contiguous)."""
    if not owns(tensor):
        raise not_cuda_tensor(tensor)
    place = tensor.place
    if not place.is_gpu_place():
        raise not_on_gpu(place)
    paddle = sys.modules["paddle"]
    t = tensor.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    index = int(place.gpu_device_id())
    s = paddle.device.current_stream(paddle.CUDAPlace(index))
    stream = int(s.__cuda_stream__()[1]) if hasattr(s, "__cuda_stream__") else int(s.stream_base.cuda_stream)
    return CudaSource(int(t.data_ptr()), math.prod(t.shape) * t.element_size(), index, t, stream)


def sync_device(device: int) -> None:
    """Wait for paddle's current stream on GPU ``device`` (where consumers copied from a slot)."""
    paddle = sys.modules.get("paddle")
    if paddle is not None:
        paddle.device.current_stream(paddle.CUDAPlace(device)).synchronize()
