"""CUDA IPC transport: bucket slots in GPU memory, mapped zero-copy by receivers on the same node.

Importing this module raises ImportError without cuda-bindings, a driver or a
visible GPU, so :func:`~.transport.available_transports` does not offer it and
``get_transport("cuda_ipc")`` raises TransportError with the reason.

Memory rules
  * Slots are plain ``cudaMalloc`` allocations made here, never torch's/Paddle's
    caching allocator: a cached block is a sub-range of a bigger segment and
    expandable segments are VMM mappings, both of which break legacy
    ``cudaIpcGetMemHandle`` sharing.
  * The sender frees a slot only in ``close()``, after ``BucketSender.close``
    said BYE; receivers close their mappings on BYE or when the sender is lost.
    A receiver that still maps a slot when the sender frees it keeps reading
    valid (stale) pages: the driver releases the physical memory when the last
    mapping closes. Slots are never freed or re-allocated during a session.
  * Each receiver opens every slot handle once per sender session (a refcounted
    per-process cache; ``OPEN_COUNT`` counts real ``cudaIpcOpenMemHandle`` calls)
    and ``cudaIpcCloseMemHandle``s it when the last user closes.

Ordering
  * Sender: ``write`` makes the transport's own non-blocking stream wait (by an
    event) for the producer's current stream, so the trainer's pending kernels
    are included, then ``cudaMemcpyAsync``; ``flush`` synchronises that stream
    before the bucket is published.
  * Receiver: typed views alias the mapped slot; consumers copy on their current
    stream (torch: the slot device's current stream, which torch also uses for
    cross-device copies from it) and ``sync`` synchronises that stream before the ACK.

Framework views
  * torch: ``torch.as_tensor`` over ``__cuda_array_interface__`` (zero-copy; torch
    holds a reference to the exporting object until the tensor dies).
  * paddle: ``paddle.utils.dlpack.from_dlpack`` over a ``cuda.core`` ``Buffer``
    (``Buffer.from_handle(ptr, size, owner=...)`` exports DLPack); without
    cuda.core, one D2D copy into a fresh paddle tensor. Paddle's own
    ``__cuda_array_interface__`` import is avoided: its deleter releases the
    exporter's reference twice (pybind.cc, ``tensor_from_cuda_array_interface``).
  * numpy: a host copy (not zero-copy).
  Paddle's native ``_share_cuda()`` tuples are not accepted (not verified here).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from ....frameworks import FRAMEWORKS, cuda_source, module, view_as
from ....frameworks._api import CudaArray
from ...dtypes import DType
from ...errors import TransportError
from ..base import Capabilities, NoFields, SlotReader, SlotWriter, create_all, host_digest
from .wire import (
    HANDLE_BYTES,
    SlotDescriptor,
    cuda_error_message,
    decode_descriptor,
    device_identity,
    encode_descriptor,
    expandable_segments_note,
    format_uuid,
)

try:
    from cuda.bindings import driver as cudrv
    from cuda.bindings import runtime as cudart
except ImportError as _exc:  # the 'cuda' extra is not installed
    raise ImportError(f"cuda-bindings is not installed ({_exc})") from _exc

log = logging.getLogger("weightstream.cuda_ipc")

__all__ = ["OPEN_COUNT", "TRANSPORT", "decode_descriptor", "device_identity", "encode_descriptor"]

_OK = cudart.cudaError_t.cudaSuccess
_D2D = cudart.cudaMemcpyKind.cudaMemcpyDefault  # UVA: also right when source and slot sit on different GPUs
_D2H = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost

#: real cudaIpcOpenMemHandle calls in this process (tests: 0 new opens per version)
OPEN_COUNT = 0


def _error_name(err: Any) -> tuple[str, str]:
    name = getattr(err, "name", str(err))
    try:
        e, text = cudart.cudaGetErrorString(err)
        return name, text.decode() if e == _OK and isinstance(text, bytes) else ""
    except Exception:  # the error string is only decoration
        return name, ""


def _check(result: tuple[Any, ...], what: str) -> Any:
    """cuda-bindings return ``(err, *values)``: raise TransportError or return the value(s)."""
    err = result[0]
    if err != _OK:
        name, text = _error_name(err)
        raise TransportError(cuda_error_message(what, name, text))
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


def _probe() -> int:
    """Visible device count, or ImportError saying why CUDA cannot be used here."""
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:
        raise ImportError(f"CUDA is unusable here ({type(exc).__name__}: {exc}); fix: install the NVIDIA driver or use transport='shm'") from exc
    if err != _OK:
        name, text = _error_name(err)
        raise ImportError(cuda_error_message("cudaGetDeviceCount", name, text))
    if count == 0:
        raise ImportError(
            f"no CUDA device is visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            "fix: expose a GPU or use transport='shm'"
        )
    return int(count)


_probe()


def _uuid_of(index: int) -> str:
    prop = _check(cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    return format_uuid(bytes(prop.uuid.bytes))


@functools.lru_cache(maxsize=1)
def _uuids() -> tuple[str, ...]:
    """UUIDs of the visible GPUs by local index (fixed for the life of a process)."""
    count = _check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    return tuple(_uuid_of(i) for i in range(count))


def _device_index(uuid: str) -> int:
    """Local index of the GPU ``uuid``: indices differ between processes, UUIDs do not."""
    seen = _uuids()
    if uuid in seen:
        return seen.index(uuid)
    raise TransportError(
        f"cuda_ipc slot lives on {uuid}, which this process cannot see (visible: {list(seen) or 'none'}, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
        "fix: make that GPU visible to the receiver, or use transport='shm'"
    )


def _has_context(index: int) -> bool:
    try:
        err, _flags, active = cudrv.cuDevicePrimaryCtxGetState(index)
    except Exception:  # unknown: restore, as the runtime would
        return True
    return err != cudrv.CUresult.CUDA_SUCCESS or bool(active)


@contextlib.contextmanager
def _on_device(index: int) -> Iterator[None]:
    """Make ``index`` current on this thread for the block (the current device is per thread).

    The previous device is restored only if it has a context: cudaSetDevice creates
    one (~500 MiB) and a daemon thread's default device 0 may be a GPU this rank never uses.
    """
    current = _check(cudart.cudaGetDevice(), "cudaGetDevice")
    if current == index:
        yield
        return
    _check(cudart.cudaSetDevice(index), "cudaSetDevice")
    try:
        yield
    finally:
        if _has_context(current):
            cudart.cudaSetDevice(current)


def _new_stream(index: int) -> int:
    with _on_device(index):
        return int(_check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"))


def _to_host(ptr: int, nbytes: int, device: int) -> np.ndarray:
    host = np.empty(nbytes, dtype=np.uint8)
    if nbytes:
        with _on_device(device):
            _check(cudart.cudaMemcpy(host.ctypes.data, ptr, nbytes, _D2H), "cudaMemcpy (device to host)")
    return host


class DeviceBytes:
    """A flat byte range of device memory; ``owner`` keeps the memory alive."""

    __slots__ = ("__weakref__", "device", "nbytes", "owner", "ptr", "stream")

    def __init__(self, ptr: int, nbytes: int, device: int, owner: Any, stream: int | None = None) -> None:
        self.ptr = ptr
        self.nbytes = nbytes
        self.device = device
        self.owner = owner
        self.stream = stream  # producer stream (sender side), None on the receiver

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return CudaArray(self, (self.nbytes,), "|u1").__cuda_array_interface__


def _owned_device_memory(nbytes: int, device: int) -> DeviceBytes:
    """A private cudaMalloc buffer freed when the last view of it dies (receiver scratch)."""
    with _on_device(device):
        ptr = int(_check(cudart.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})"))
    buf = DeviceBytes(ptr, nbytes, device, None)
    weakref.finalize(buf, _free, ptr, device)
    return buf


def _free(ptr: int, device: int) -> None:
    try:
        with _on_device(device):
            err = cudart.cudaFree(ptr)[0]
        if err != _OK:
            log.warning("cudaFree(%#x) on device %d: %s", ptr, device, _error_name(err)[0])
    except Exception as exc:  # interpreter shutdown: the driver reclaims it with the process
        log.debug("cudaFree(%#x): %s", ptr, exc)


# --- sender ----------------------------------------------------------------------------------


def _source(tensor: Any) -> DeviceBytes:
    """A flat byte range over a CUDA torch/paddle tensor (one copy if not contiguous)."""
    found = cuda_source(tensor)
    return DeviceBytes(found.ptr, found.nbytes, found.device, found.owner, found.stream)


class CudaExportedSlot(SlotWriter):
    """One cudaMalloc'd bucket slot, shared by its 64-byte IPC handle."""

    def __init__(self, size: int) -> None:
        self.device = int(_check(cudart.cudaGetDevice(), "cudaGetDevice"))
        self.size = size
        self.ptr = 0
        self._stream = 0
        self._events: dict[int, int] = {}  # producer device -> event (records need a same-device event)
        self._waited: DeviceBytes | None = None
        self._keep: list[DeviceBytes] = []  # sources alive until flush: their copies may still be queued
        with _on_device(self.device):
            self.ptr = int(_check(cudart.cudaMalloc(size), f"cudaMalloc({size}) for a bucket slot"))
            try:
                _check(cudart.cudaMemset(self.ptr, 0, size), "cudaMemset")  # commit pages now, not in the first push
                handle = _check(cudart.cudaIpcGetMemHandle(self.ptr), "cudaIpcGetMemHandle")
                # cuda-bindings >= 13.4 has no .reserved: the 64 bytes are read through the struct pointer
                raw = ctypes.string_at(int(handle.getPtr()), HANDLE_BYTES)
                self._stream = _new_stream(self.device)
            except BaseException:
                self.close()
                raise
        self._desc = encode_descriptor(raw, size, _uuid_of(self.device), os.getpid())

    def descriptor(self) -> dict[str, Any]:
        return dict(self._desc)

    def source_bytes(self, tensor: Any) -> DeviceBytes:
        return _source(tensor)

    def _event(self, device: int) -> int:
        event = self._events.get(device)
        if event is None:
            with _on_device(device):
                event = int(_check(cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming), "cudaEventCreateWithFlags"))
            self._events[device] = event
        return event

    def write(self, offset: int, source: DeviceBytes, start: int, nbytes: int) -> None:
        if not self.ptr:
            raise TransportError("cuda_ipc slot is closed")
        if offset < 0 or start < 0 or offset + nbytes > self.size or start + nbytes > source.nbytes:
            raise TransportError(
                f"cuda_ipc write: expected bytes {start}..{start + nbytes} of a {source.nbytes}-byte source into "
                f"{offset}..{offset + nbytes} of a {self.size}-byte slot"
            )
        if source is not self._waited:  # once per tensor: its producer's queued kernels come first
            event = self._event(source.device)
            with _on_device(source.device):  # stream handle 0 means the *current* device's legacy stream
                _check(cudart.cudaEventRecord(event, source.stream or 0), "cudaEventRecord")
            _check(cudart.cudaStreamWaitEvent(self._stream, event, 0), "cudaStreamWaitEvent")
            self._waited = source
            self._keep.append(source)
        with _on_device(self.device):
            _check(
                cudart.cudaMemcpyAsync(self.ptr + offset, source.ptr + start, nbytes, _D2D, self._stream),
                "cudaMemcpyAsync (into a bucket slot)",
            )

    def flush(self) -> None:
        if self._stream:
            _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize (bucket copies)")
        self._keep.clear()
        self._waited = None

    def digest(self, nbytes: int) -> int:
        return device_digest(self.ptr, nbytes, self.device)

    def close(self) -> None:
        """Free the slot: only after BYE (see the module doc for why that is safe)."""
        with contextlib.suppress(Exception), _on_device(self.device):
            if self._stream:
                cudart.cudaStreamSynchronize(self._stream)
                cudart.cudaStreamDestroy(self._stream)
                self._stream = 0
            for event in self._events.values():
                cudart.cudaEventDestroy(event)
            self._events.clear()
            if self.ptr:
                err = cudart.cudaFree(self.ptr)[0]
                if err != _OK:
                    log.warning("cudaFree of a bucket slot: %s", _error_name(err)[0])
                self.ptr = 0
        self._keep.clear()


# --- receiver --------------------------------------------------------------------------------


class _Mapping:
    __slots__ = ("device", "ptr", "users")

    def __init__(self, ptr: int, device: int) -> None:
        self.ptr, self.device, self.users = ptr, device, 1


_MAPPINGS: dict[bytes, _Mapping] = {}
_MAPPINGS_LOCK = threading.Lock()


def _handle_of(raw: bytes) -> Any:
    handle = cudart.cudaIpcMemHandle_t()
    ctypes.memmove(int(handle.getPtr()), raw, HANDLE_BYTES)
    return handle


def _peer_gone(pid: int) -> bool:
    try:
        import psutil

        return not psutil.pid_exists(pid)
    except ImportError:  # pragma: no cover - psutil is a dependency
        return False


def _open(desc: SlotDescriptor, device: int) -> _Mapping:
    global OPEN_COUNT
    with _MAPPINGS_LOCK:
        mapping = _MAPPINGS.get(desc.handle)
        if mapping is not None:
            mapping.users += 1
            return mapping
        with _on_device(device):
            err, ptr = cudart.cudaIpcOpenMemHandle(_handle_of(desc.handle), cudart.cudaIpcMemLazyEnablePeerAccess)
        if err != _OK:
            name, text = _error_name(err)
            if _peer_gone(desc.pid):
                raise TransportError(
                    f"cuda_ipc: the sender process {desc.pid} that exported this slot is gone ({name}); "
                    "fix: restart the sender; the receiver reconnects on its next WELCOME"
                )
            raise TransportError(cuda_error_message(f"cudaIpcOpenMemHandle (slot of pid {desc.pid} on {desc.device})", name, text))
        OPEN_COUNT += 1
        mapping = _MAPPINGS[desc.handle] = _Mapping(int(ptr), device)
        return mapping


def _release(handle: bytes) -> None:
    with _MAPPINGS_LOCK:
        mapping = _MAPPINGS.get(handle)
        if mapping is None:
            return
        mapping.users -= 1
        if mapping.users > 0:
            return
        del _MAPPINGS[handle]
    try:
        with _on_device(mapping.device):
            err = cudart.cudaIpcCloseMemHandle(mapping.ptr)[0]
        if err != _OK:
            log.warning("cudaIpcCloseMemHandle: %s", _error_name(err)[0])
    except TransportError as exc:
        log.warning("closing a cuda_ipc mapping: %s", exc)


_DIGEST_CHUNK_WORDS = 16 << 20  # 128 MiB of int64 per step bounds the temporaries
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64


def device_digest(ptr: int, nbytes: int, device: int) -> int:
    """A 64-bit digest computed on the GPU, so checking a bucket costs no host copy.

    Each 8-byte word is multiplied by an odd, position-dependent constant and the
    products are summed with int64 wrap-around: exact and order-independent (so
    deterministic across runs and GPUs), and it changes when any word changes or
    two words swap. It detects corruption, not tampering: use CURVE for that. The
    trailing < 8 bytes are hashed on the host. Sender and receivers both use it.
    """
    import torch

    words, tail = divmod(nbytes, 8)
    total = 0
    if words:
        dev = torch.device("cuda", device)
        x = torch.as_tensor(CudaArray(DeviceBytes(ptr, words * 8, device, None), (words,), "<i8"), device=dev)
        acc = torch.zeros((), dtype=torch.int64, device=dev)
        for start in range(0, words, _DIGEST_CHUNK_WORDS):
            part = x[start : start + _DIGEST_CHUNK_WORDS]
            index = torch.arange(start, start + part.numel(), dtype=torch.int64, device=dev)
            acc += (part * (index * _GOLDEN | 1)).sum()
        torch.cuda.current_stream(dev).synchronize()
        total = int(acc.item()) & ((1 << 64) - 1)
    if tail:
        total ^= host_digest(_to_host(ptr + words * 8, tail, device))
    return total


class DeviceSlotReader(SlotReader):
    """A rank's reads out of a slot of device memory at ``ptr`` (``size`` bytes on GPU ``device``):
    an IPC-mapped sender slot, or a rank's own receive slot (nccl)."""

    domain = "cuda"
    streams = False  # device copies: no host cache to bypass
    ptr: int
    size: int
    device: int
    _stream = 0  # created on first use (chunk copies)
    _used: set[str]  # frameworks that read from this slot: their streams are synced

    def _own_stream(self) -> int:
        if not self._stream:
            self._stream = _new_stream(self.device)
        return self._stream

    def raw(self, offset: int, nbytes: int) -> DeviceBytes:
        if not self.ptr:
            raise TransportError("cuda_ipc slot is closed")
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise TransportError(f"cuda_ipc slot: bytes {offset}..{offset + nbytes} lie outside {self.size}")
        return DeviceBytes(self.ptr + offset, nbytes, self.device, self)

    def typed(self, framework: str, buffer: DeviceBytes, dtype: DType, shape: tuple[int, ...]) -> Any:
        expected = dtype.itemsize * math.prod(shape)
        if buffer.nbytes != expected:
            raise TransportError(
                f"cuda_ipc view: expected {expected} bytes for {dtype.name}{list(shape)}, got {buffer.nbytes}"
            )
        if framework not in FRAMEWORKS:
            raise TransportError(f"framework: expected numpy, paddle or torch, got {framework!r}")
        if framework == "numpy":  # NumPy has no GPU arrays: a host copy
            return view_as("numpy", _to_host(buffer.ptr, buffer.nbytes, buffer.device), dtype, shape)
        self._used.add(framework)
        fw = module(framework)
        found = fw.device_view(buffer, dtype, shape)
        if found is not None:
            return found
        # no zero-copy import (paddle without cuda.core): one D2D copy into the framework's own memory
        flat = fw.empty_bytes(buffer.nbytes, buffer.device)
        stream = self._own_stream()
        with _on_device(buffer.device):
            _check(cudart.cudaMemcpyAsync(fw.data_ptr(flat), buffer.ptr, buffer.nbytes, _D2D, stream), "cudaMemcpyAsync")
            _check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return fw.retype(flat, dtype, shape)

    def scratch(self, nbytes: int) -> DeviceBytes:
        return _owned_device_memory(nbytes, self.device)

    def copy(self, dst: DeviceBytes, at: int, src: DeviceBytes) -> None:
        if at < 0 or at + src.nbytes > dst.nbytes:
            raise TransportError(f"cuda_ipc copy: {src.nbytes} bytes at {at} do not fit {dst.nbytes}")
        if not src.nbytes:
            return
        stream = self._own_stream()
        with _on_device(self.device):
            _check(cudart.cudaMemcpyAsync(dst.ptr + at, src.ptr, src.nbytes, _D2D, stream), "cudaMemcpyAsync (chunk)")
            _check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize (chunk)")

    def sync(self) -> None:
        """Consumers' reads of this slot are done: sync the stream they used on the slot's GPU."""
        for framework in self._used:
            module(framework).sync_device(self.device)
        if self._stream:
            _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def digest(self, nbytes: int) -> int:
        return device_digest(self.ptr, nbytes, self.device)


class CudaImportedSlot(DeviceSlotReader):
    def __init__(self, descriptor: dict[str, Any]) -> None:
        desc = decode_descriptor(descriptor)
        if desc.pid == os.getpid():
            raise TransportError(
                "cuda_ipc: this slot was exported by this very process; CUDA cannot open an IPC handle in the "
                "process that created it. fix: run the receiver in a second process, or use transport='shm'"
            )
        self.device = _device_index(desc.device)
        self.size = desc.size
        self._handle = desc.handle
        mapping = _open(desc, self.device)
        self.ptr = mapping.ptr
        self._stream = 0
        self._used = set()

    def close(self) -> None:
        if not self.ptr:
            return
        self.ptr = 0
        if self._stream:
            with contextlib.suppress(Exception), _on_device(self.device):
                cudart.cudaStreamSynchronize(self._stream)
                cudart.cudaStreamDestroy(self._stream)
            self._stream = 0
        _release(self._handle)


class CudaIpcTransport(NoFields):
    name = "cuda_ipc"
    capabilities = Capabilities(same_host=True, device="cuda")

    def create_slots(self, count: int, size: int, session: str = "") -> list[CudaExportedSlot]:
        note = expandable_segments_note()
        if note is not None:
            log.warning("%s", note)
        return create_all(CudaExportedSlot, count, size)

    def open_slot(
        self, descriptor: dict[str, Any], owner: tuple[int, str] | None = None, insecure: bool = False
    ) -> CudaImportedSlot:
        # an IPC handle opens only memory its exporter shared on purpose; the pid check is in the slot
        return CudaImportedSlot(descriptor)


TRANSPORT = CudaIpcTransport()
