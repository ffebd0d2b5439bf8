"""The one place that knows NumPy, torch and paddle tensors: one module per framework.

:mod:`.numpy`, :mod:`.torch` and :mod:`.paddle` each offer the same functions with the same
signatures and errors (``_api.FrameworkModule``): dtype tables, host bytes, zero-copy views,
device views, materialisation checks, memory keys. This package picks the module of a
tensor (:func:`module_of`) or of a name (:func:`module`), and keeps the tensor-level helpers
callers import from here (:func:`host_bytes`, :func:`view_as`, :func:`bytes_view`, ...).

torch and paddle are never imported here unless the caller already uses them (a tensor of
theirs exists) or asks for them (a view of that framework). All 12 wire dtypes are zero-copy
in all three frameworks, 0-d and empty tensors included.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any, cast

import numpy as np

from ..protocol.dtypes import BY_NUMPY, INT_OF_ITEMSIZE, DType
from ..protocol.errors import WeightstreamError
from . import numpy as _numpy
from . import paddle as _paddle
from . import torch as _torch
from ._api import CudaSource, DeviceMemory, Framework, FrameworkModule, not_a_tensor, not_cuda_tensor

__all__ = [
    "FRAMEWORKS", "INT_OF_ITEMSIZE", "CudaSource", "DeviceMemory", "Framework", "FrameworkModule", "bytes_view",
    "cuda_source", "detached_copy", "dtype_of", "framework_of", "host_bytes", "is_model", "memory_key", "module", "module_of",
    "shape_of", "to_host", "unmaterialised", "view_as",
]

FRAMEWORKS: tuple[Framework, ...] = ("numpy", "paddle", "torch")

_MODULES: dict[str, FrameworkModule] = {
    "numpy": cast(FrameworkModule, _numpy),
    "paddle": cast(FrameworkModule, _paddle),
    "torch": cast(FrameworkModule, _torch),
}
# the order tensors are tried in: NumPy first (the commonest, and no sys.modules lookup)
_BY_LIKELIHOOD = (_MODULES["numpy"], _MODULES["torch"], _MODULES["paddle"])


def module(framework: str) -> FrameworkModule:
    """The module of a framework name; a WeightstreamError naming the choices for anything else."""
    found = _MODULES.get(framework) if isinstance(framework, str) else None
    if found is None:
        raise WeightstreamError(
            f"framework: expected one of {', '.join(FRAMEWORKS)}, got {framework!r}; "
            "fix: pass framework='numpy'|'paddle'|'torch'"
        )
    return found


def module_of(tensor: Any) -> FrameworkModule:
    """The module of the framework a tensor belongs to, without importing torch or paddle."""
    for fw in _BY_LIKELIHOOD:
        if fw.owns(tensor):
            return fw
    raise not_a_tensor(tensor)


def framework_of(tensor: Any) -> Framework:
    """Which framework a tensor belongs to, without importing torch or paddle."""
    return module_of(tensor).NAME


def is_model(obj: Any) -> bool:
    """A torch ``nn.Module`` or a paddle ``nn.Layer`` (never imports either)."""
    return _torch.is_model(obj) or _paddle.is_model(obj)


def unmaterialised(model: Any) -> list[str]:
    """State-dict names of a torch module / paddle layer that hold no data yet (meta, LazyGuard)."""
    for fw in (_MODULES["torch"], _MODULES["paddle"]):
        if fw.is_model(model):
            return fw.unmaterialised(model)
    return []


def dtype_of(tensor: Any) -> DType:
    """The wire dtype of a NumPy array/scalar, torch tensor or paddle tensor."""
    return module_of(tensor).dtype_of(tensor)


def shape_of(tensor: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in tensor.shape)


def memory_key(tensor: Any) -> Hashable | None:
    """Tensors with one key alias each other: the same memory, dtype, shape and strides (tied
    weights, or ``state_dict()`` listing one Parameter under two names). None: never an alias
    (empty, unmaterialised, or a kind whose memory is not known)."""
    for fw in _BY_LIKELIHOOD:
        if fw.owns(tensor):
            return fw.memory_key(tensor)
    return None


def detached_copy(tensor: Any) -> Any:
    """A private copy of a tensor in its own framework (e.g. of a slot view, kept past its bucket)."""
    return module_of(tensor).detached_copy(tensor)


def to_host(tensor: Any) -> Any:
    """A CPU tensor for :func:`host_bytes` (a GPU one costs one device-to-host copy)."""
    return module_of(tensor).to_host(tensor)


def cuda_source(tensor: Any) -> CudaSource:
    """A CUDA tensor's bytes for a device transport; TransportError for anything else (host tensors included)."""
    for fw in _BY_LIKELIHOOD:
        if fw.owns(tensor):
            return fw.cuda_source(tensor)
    raise not_cuda_tensor(tensor)


def bytes_view(tensor: Any) -> np.ndarray | None:
    """A writable zero-copy 1-D uint8 view of a tensor's bytes, or None if none exists.

    None when the tensor is not C-contiguous, not on the CPU, not materialised or
    read-only: callers that must write in place then fall back to a framework copy.
    """
    return module_of(tensor).bytes_view(tensor)


def host_bytes(tensor: Any) -> np.ndarray:
    """A 1-D uint8 NumPy array over the tensor's bytes in C order.

    Zero-copy for C-contiguous CPU tensors of every framework and dtype; a non-contiguous
    tensor costs one contiguous copy. GPU tensors raise TransportError. The result may be
    read-only (a read-only NumPy input stays so).
    """
    if type(tensor) is np.ndarray and tensor.flags.c_contiguous and tensor.dtype in BY_NUMPY:
        return tensor.reshape(-1).view(np.uint8)  # the hot path: no checks beyond these
    return module_of(tensor).host_bytes(tensor)


def view_as(framework: Framework, buf: np.ndarray, dtype: DType, shape: tuple[int, ...]) -> Any:
    """A typed tensor of ``framework`` over ``buf`` (1-D uint8, ``prod(shape)*itemsize`` long).

    Zero-copy for every dtype in every framework, 0-d and empty shapes included: writes
    to ``buf`` are visible in the result, and the result keeps ``buf`` alive. One
    documented exception: for torch/paddle a read-only ``buf`` is copied first, since
    both would hand out a writable tensor over read-only memory. The checked form of
    each module's ``view``.
    """
    expected = math.prod(shape) * dtype.itemsize
    if buf.dtype != np.uint8 or buf.ndim != 1 or buf.size != expected:
        raise WeightstreamError(
            f"view_as: expected a 1-D uint8 buffer of {expected} bytes for {dtype.name}{list(shape)}, "
            f"got {buf.dtype}{list(buf.shape)}; fix: slice the bucket with the entry's offset and nbytes"
        )
    fw = module(framework)
    if fw is not _MODULES["numpy"] and not buf.flags.writeable:
        buf = buf.copy()
    return fw.view(buf, dtype, tuple(shape))
