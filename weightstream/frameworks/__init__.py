"""The one place that knows NumPy, torch and paddle tensors.

Sender side: :func:`host_bytes` turns a tensor into a flat uint8 NumPy array over its
bytes. Receiver side: :func:`view_as` turns a slice of a bucket back into a typed
tensor of the wanted framework without copying. torch and paddle are never imported
here unless the caller already uses them (a tensor of theirs exists) or asks for them.

Zero-copy paths, checked on torch 2.x and paddle 3.x CPU. Every reinterpretation goes
through the unsigned/signed integer of the SAME itemsize (``_INT``): paddle's
``view(dtype)`` between different itemsizes mis-scales the storage offset of sliced
tensors and rejects empty ones, and NumPy's DLPack import has no bfloat16/float8.

- torch -> bytes: ``t.detach().view(int_N).numpy()`` then a NumPy flat uint8 view.
- paddle -> bytes: ``np.from_dlpack(t.detach().view(int_N))`` then a NumPy flat uint8 view
  (``Tensor.numpy()`` would always copy, and returns uint16/int8 for bf16/fp8). NumPy 1.x
  marks every array it imports by DLPack read-only, and a sink writes into these views: there
  the flat uint8 array is built over ``t.data_ptr()`` through ``__array_interface__``
  (:class:`_TensorMemory`), and keeps the tensor alive as its ``base``.
- bytes -> torch: ``torch.from_numpy(buf.view(int_N).reshape(shape)).view(dtype)``.
- bytes -> paddle: ``paddle.from_dlpack(buf.view(int_N).reshape(shape)).view(dtype)``; the
  tensor holds a reference to ``buf`` through the DLPack capsule.

All 12 dtypes are zero-copy in all three frameworks, 0-d and empty tensors included.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Literal

import numpy as np

from ..protocol.dtypes import BY_NUMPY, DType, dtype_of
from ..protocol.errors import TransportError, WeightstreamError

Framework = Literal["numpy", "paddle", "torch"]
FRAMEWORKS: tuple[Framework, ...] = ("numpy", "paddle", "torch")

# itemsize -> the integer dtype every reinterpretation goes through (see module doc)
_INT_NAME = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}
INT_OF_ITEMSIZE = {n: np.dtype(name) for n, name in _INT_NAME.items()}  # same-width ints to reinterpret through


def framework_of(tensor: Any) -> Framework:
    """Which framework a tensor belongs to, without importing torch or paddle."""
    if isinstance(tensor, (np.ndarray, np.generic)):
        return "numpy"
    # A torch/paddle tensor can only exist if its framework is already imported.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(tensor, torch.Tensor):
        return "torch"
    paddle = sys.modules.get("paddle")
    if paddle is not None and isinstance(tensor, paddle.Tensor):
        return "paddle"
    raise WeightstreamError(
        f"tensor: expected a numpy array, torch tensor or paddle tensor, got {type(tensor).__qualname__}; "
        "fix: convert it to one of those (e.g. np.asarray)"
    )


def shape_of(tensor: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in tensor.shape)


def _check_torch_device(tensor: Any) -> None:
    kind = tensor.device.type
    if kind == "cpu":
        return
    if kind == "meta":
        raise WeightstreamError(
            "tensor: expected a materialised tensor, got one on the meta device (no data); "
            "fix: materialise it (e.g. module.to_empty(device=...) and load weights) before sending"
        )
    hint = 'use transport="cuda_ipc"' if kind == "cuda" else "use a GPU transport"
    raise TransportError(
        f"tensor: expected a CPU tensor for a host transport, got one on {tensor.device}; "
        f"fix: {hint} or move it with .cpu()"
    )


def _check_paddle_place(tensor: Any) -> None:
    if not tensor._is_initialized():
        raise WeightstreamError(
            "tensor: expected an initialised paddle tensor, got one without data (e.g. made under paddle.LazyGuard); "
            "fix: initialise it before sending"
        )
    place = tensor.place
    if place.is_gpu_place():
        raise TransportError(
            f"tensor: expected a CPU tensor for a host transport, got one on {place}; "
            'fix: use transport="cuda_ipc" or move it with .cpu()'
        )


def _torch_bytes(t: Any) -> np.ndarray:
    """Flat uint8 view of a contiguous CPU torch tensor (no copy)."""
    torch = sys.modules["torch"]
    itype = getattr(torch, _INT_NAME[t.element_size()])
    t = t.detach()
    if t.is_neg():  # a lazily negated view (torch._neg_view): its memory does not hold its values
        t = t.resolve_neg()
    return (t if t.dtype == itype else t.view(itype)).numpy().reshape(-1).view(np.uint8)


def _paddle_bytes_dlpack(t: Any) -> np.ndarray:
    """Flat uint8 view of a contiguous, initialised CPU paddle tensor (no copy); NumPy 2."""
    paddle = sys.modules["paddle"]
    itype = getattr(paddle, _INT_NAME[t.element_size()])
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


def _paddle_bytes_pointer(t: Any) -> np.ndarray:
    """Flat uint8 view of a contiguous, initialised CPU paddle tensor (no copy), built over its
    ``data_ptr()``: writable on every NumPy (NumPy 1.x's ``from_dlpack`` is read-only)."""
    nbytes = math.prod(t.shape) * t.element_size()  # t.numel() would be a paddle Tensor
    if not nbytes:
        return np.empty(0, np.uint8)  # nothing to alias; an empty tensor may have no pointer
    return np.asarray(_TensorMemory(t, t.data_ptr(), nbytes))


# NumPy < 2 imports every DLPack array read-only (NumPy 2 only when the producer says so)
_paddle_bytes = _paddle_bytes_dlpack if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else _paddle_bytes_pointer


def bytes_view(tensor: Any) -> np.ndarray | None:
    """A writable zero-copy 1-D uint8 view of a tensor's bytes, or None if none exists.

    None when the tensor is not C-contiguous, not on the CPU, not materialised or
    read-only: callers that must write in place then fall back to a framework copy.
    """
    fw = framework_of(tensor)
    if fw == "numpy":
        if not isinstance(tensor, np.ndarray) or not tensor.flags.c_contiguous or not tensor.flags.writeable:
            return None
        return tensor.reshape(-1).view(np.uint8)
    if tensor.element_size() not in _INT_NAME:  # e.g. complex128: not a wire dtype anyway
        return None
    if fw == "torch":
        if tensor.device.type != "cpu" or tensor.layout != sys.modules["torch"].strided or not tensor.is_contiguous():
            return None
        return _torch_bytes(tensor)
    if not tensor._is_initialized() or not tensor.place.is_cpu_place() or not tensor.is_contiguous():
        return None
    return _paddle_bytes(tensor)


def host_bytes(tensor: Any) -> np.ndarray:
    """A 1-D uint8 NumPy array over the tensor's bytes in C order.

    Zero-copy for C-contiguous CPU tensors of every framework and dtype (see module
    doc); a non-contiguous tensor costs one contiguous copy. GPU tensors raise
    TransportError. The result may be read-only (a read-only NumPy input stays so).
    """
    if type(tensor) is np.ndarray and tensor.flags.c_contiguous and tensor.dtype in BY_NUMPY:
        return tensor.reshape(-1).view(np.uint8)  # the hot path: no checks beyond these
    fw = framework_of(tensor)
    dtype_of(tensor)  # reject unsupported dtypes here, with the list of supported ones
    if fw == "numpy":
        arr = np.ascontiguousarray(tensor)  # no copy when already C-contiguous
        return arr.reshape(-1).view(np.uint8)
    if fw == "torch":
        _check_torch_device(tensor)
        return _torch_bytes(tensor if tensor.is_contiguous() else tensor.contiguous())  # the one copy
    _check_paddle_place(tensor)
    t = tensor if tensor.place.is_cpu_place() else tensor.cpu()  # pinned/custom device: one copy
    return _paddle_bytes(t if t.is_contiguous() else t.contiguous())  # else: the one copy


def view_as(framework: Framework, buf: np.ndarray, dtype: DType, shape: tuple[int, ...]) -> Any:
    """A typed tensor of ``framework`` over ``buf`` (1-D uint8, ``prod(shape)*itemsize`` long).

    Zero-copy for every dtype in every framework, 0-d and empty shapes included: writes
    to ``buf`` are visible in the result, and the result keeps ``buf`` alive. One
    documented exception: for torch/paddle a read-only ``buf`` is copied first, since
    both would hand out a writable tensor over read-only memory.
    """
    expected = math.prod(shape) * dtype.itemsize
    if buf.dtype != np.uint8 or buf.ndim != 1 or buf.size != expected:
        raise WeightstreamError(
            f"view_as: expected a 1-D uint8 buffer of {expected} bytes for {dtype.name}{list(shape)}, "
            f"got {buf.dtype}{list(buf.shape)}; fix: slice the bucket with the entry's offset and nbytes"
        )
    if framework == "numpy":
        return buf.view(dtype.numpy).reshape(shape)
    if framework not in FRAMEWORKS:
        raise WeightstreamError(
            f"framework: expected one of {', '.join(FRAMEWORKS)}, got {framework!r}; "
            "fix: pass framework='numpy'|'paddle'|'torch'"
        )
    if not buf.flags.writeable:
        buf = buf.copy()
    ints = buf.view(INT_OF_ITEMSIZE[dtype.itemsize]).reshape(shape)  # NumPy view: shape is free
    if framework == "torch":
        import torch

        t = torch.from_numpy(ints)
        target = dtype.torch()
    else:
        import paddle

        t = paddle.from_dlpack(ints)
        target = dtype.paddle()
    return t if t.dtype == target else t.view(target)
