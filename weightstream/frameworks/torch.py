"""What weightstream knows of torch tensors (the interface in ``_api.FrameworkModule``).

torch is imported only by functions that make torch objects from ours (dtypes, views); the
rest get a torch tensor, so torch is in ``sys.modules`` already.

Zero-copy paths (torch 2.x), every reinterpretation through the same-width integer
(``INT_OF_ITEMSIZE``):

- tensor -> bytes: ``t.detach().view(int_N).numpy()`` then a NumPy flat uint8 view.
- bytes -> tensor: ``torch.from_numpy(buf.view(int_N).reshape(shape)).view(dtype)`` (bool
  through NumPy's bool, which torch takes as is); many small tensors take this path, so
  its per-dtype choices are made once (:func:`_views`).
- GPU bytes -> tensor: ``torch.as_tensor`` over a ``__cuda_array_interface__`` of int_N
  (torch holds the exporter, and so the memory's owner, until the tensor dies).
"""

from __future__ import annotations

import sys
from collections.abc import Hashable
from typing import Any

import numpy as np

from ..protocol.dtypes import DTYPES, INT_OF_ITEMSIZE, DType
from ..protocol.errors import WeightstreamError
from ._api import (
    CudaArray,
    CudaSource,
    DeviceMemory,
    Framework,
    NativeDtypes,
    not_cuda_tensor,
    not_on_gpu,
    not_on_host,
    rows,
)

NAME: Framework = "torch"

_VIEWS: tuple[tuple[np.dtype, Any], ...] | None = None  # by code: (NumPy dtype to view as, torch dtype or None)
_from_numpy: Any = None


def imported() -> bool:
    """Whether torch is imported in this process (none of its objects can exist before)."""
    return "torch" in sys.modules


def owns(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def is_model(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


# --- dtypes ------------------------------------------------------------------------------------


_DTYPES = NativeDtypes("torch", "upgrade torch (float8 needs torch >= 2.1)")
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
    return str(tensor.device)


def is_materialised(tensor: Any) -> bool:
    return not tensor.is_meta


def check_sendable(tensor: Any) -> None:
    """A tensor with no data of its own, or not dense, cannot be packed: say so before anything moves."""
    if tensor.is_meta:
        raise WeightstreamError(
            "expected a materialised tensor, got one on the meta device (it has no data); fix: materialise and "
            "load it before pushing (e.g. module.to_empty(device='cpu') and load_state_dict)"
        )
    if tensor.layout != sys.modules["torch"].strided:
        raise WeightstreamError(
            f"expected a dense (strided) tensor, got layout {tensor.layout}; fix: push tensor.to_dense()"
        )


def memory_key(tensor: Any) -> Hashable | None:
    """Equal for tensors over the same memory with the same dtype, shape and strides (tied
    weights, one Parameter under two names); None for an empty or meta tensor."""
    if not tensor.numel() or tensor.is_meta:
        return None
    return ("torch", str(tensor.device), tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())


def unmaterialised(model: Any) -> list[str]:
    """State-dict names of ``model`` (an ``nn.Module``) still on the meta device."""
    torch = sys.modules["torch"]
    return [n for n, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor) and t.is_meta]


# --- host bytes --------------------------------------------------------------------------------


def _bytes(t: Any) -> np.ndarray:
    """Flat uint8 view of a contiguous CPU tensor (no copy)."""
    itype = _ints()[t.element_size()]
    t = t.detach()
    if t.is_neg():  # a lazily negated view (torch._neg_view): its memory does not hold its values
        t = t.resolve_neg()
    flat: np.ndarray = (t if t.dtype == itype else t.view(itype)).numpy().reshape(-1).view(np.uint8)
    return flat


def _check_host(tensor: Any) -> None:
    kind = tensor.device.type
    if kind == "cpu":
        return
    if kind == "meta":
        raise WeightstreamError(
            "tensor: expected a materialised tensor, got one on the meta device (no data); "
            "fix: materialise it (e.g. module.to_empty(device=...) and load weights) before sending"
        )
    raise not_on_host(tensor.device, 'use transport="cuda_ipc"' if kind == "cuda" else "use a GPU transport")


def host_bytes(tensor: Any) -> np.ndarray:
    """A 1-D uint8 array over a CPU tensor's bytes in C order: zero-copy when contiguous, else
    one copy. A meta tensor raises WeightstreamError, a GPU one TransportError."""
    dtype_of(tensor)  # reject unsupported dtypes, with the list of supported ones
    _check_host(tensor)
    return _bytes(tensor if tensor.is_contiguous() else tensor.contiguous())  # else: the one copy


def bytes_view(tensor: Any) -> np.ndarray | None:
    """A writable zero-copy 1-D uint8 view of a tensor's bytes; None unless a contiguous dense CPU tensor."""
    if tensor.element_size() not in INT_OF_ITEMSIZE:  # e.g. complex128: not a wire dtype anyway
        return None
    if tensor.device.type != "cpu" or tensor.layout != sys.modules["torch"].strided or not tensor.is_contiguous():
        return None
    return _bytes(tensor)


def _views() -> tuple[tuple[np.dtype, Any], ...]:
    """Per wire code: the NumPy dtype to view bytes as, and the torch dtype to reinterpret
    ``torch.from_numpy``'s result as (None when it already is that dtype)."""
    global _VIEWS, _from_numpy
    if _VIEWS is None:
        import torch

        table = []
        for d in DTYPES:
            as_ints = INT_OF_ITEMSIZE[d.itemsize] if d.name != "bool" else np.dtype(np.bool_)
            target = native_dtype(d)
            table.append((as_ints, None if torch.from_numpy(np.zeros(1, as_ints)).dtype == target else target))
        _from_numpy = torch.from_numpy
        _VIEWS = tuple(table)
    return _VIEWS


def view(buf: np.ndarray, dtype: DType, shape: tuple[int, ...]) -> Any:
    """A torch tensor over ``buf`` (1-D uint8, ``prod(shape) * itemsize`` bytes, writable), zero-copy;
    nothing checked: the receiver's hot path (``weightstream.frameworks.view_as`` checks)."""
    as_ints, target = (_VIEWS or _views())[dtype.code]
    t = _from_numpy(buf.view(as_ints).reshape(shape))
    return t if target is None else t.view(target)


def views(buf: np.ndarray, dtype: DType, shape: tuple[int, ...], count: int, offset: int, stride: int) -> Any:
    """``count`` torch tensors of ``shape`` over ``buf`` (1-D uint8, writable), the first at byte
    ``offset``, each ``stride`` bytes after the last: :func:`view` of each, made in one batch."""
    as_ints, target = (_VIEWS or _views())[dtype.code]
    t = _from_numpy(rows(buf, as_ints, shape, count, offset, stride))
    return (t if target is None else t.view(target)).unbind(0)


def retype(flat: Any, dtype: DType, shape: tuple[int, ...]) -> Any:
    """A typed view over ``flat``, a 1-D uint8 torch tensor of ``prod(shape) * itemsize`` bytes
    starting at its storage's offset 0 (a buffer of its own), on any device."""
    target = native_dtype(dtype)
    t = flat.view(_ints()[dtype.itemsize]).reshape(shape)
    return t if t.dtype == target else t.view(target)


def detached_copy(tensor: Any) -> Any:
    return tensor.clone()


def to_host(tensor: Any) -> Any:
    """A CPU tensor (a GPU one costs one device-to-host copy); meta and CPU tensors as they are."""
    return tensor.detach().cpu() if tensor.device.type not in ("cpu", "meta") else tensor


# --- device memory -----------------------------------------------------------------------------


def device_view(buf: DeviceMemory, dtype: DType, shape: tuple[int, ...]) -> Any:
    """A torch tensor over GPU memory (``prod(shape) * itemsize`` bytes at ``buf.ptr``), zero-copy;
    it keeps ``buf`` alive."""
    import torch

    target = native_dtype(dtype)
    device = torch.device("cuda", buf.device)
    if buf.nbytes == 0:
        return torch.empty(shape, dtype=target, device=device)
    # device= is explicit: older torch would otherwise copy the interface object to the default device
    t = torch.as_tensor(CudaArray(buf, shape, INT_OF_ITEMSIZE[dtype.itemsize].str), device=device)
    return t if t.dtype == target else t.view(target)


def empty_bytes(nbytes: int, device: int | None) -> Any:
    """A new 1-D uint8 tensor of ``nbytes`` on GPU ``device`` (None: the host)."""
    import torch

    return torch.empty(nbytes, dtype=torch.uint8, device="cpu" if device is None else torch.device("cuda", device))


def data_ptr(tensor: Any) -> int:
    return int(tensor.data_ptr())


def cuda_source(tensor: Any) -> CudaSource:
    """A CUDA tensor's bytes (one copy, on its current stream, if not contiguous)."""
    if not owns(tensor):
        raise not_cuda_tensor(tensor)
    if tensor.device.type != "cuda":
        raise not_on_gpu(tensor.device)
    torch = sys.modules["torch"]
    t = tensor.detach()
    if not t.is_contiguous():
        t = t.contiguous()  # runs on the current stream, which the copy is ordered after
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    stream = int(torch.cuda.current_stream(t.device).cuda_stream)
    return CudaSource(int(t.data_ptr()), t.numel() * t.element_size(), index, t, stream)


def sync_device(device: int) -> None:
    """Wait for torch's current stream on GPU ``device`` (where consumers copied from a slot)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.cuda.current_stream(device).synchronize()
