"""``nccl``: buckets broadcast through a c10d ``ProcessGroupNCCL`` made per push (see :mod:`.c10d`),
between slots of GPU memory: for ranks on other hosts whose model lives on a GPU. Needs
``insecure=True``, a GPU on the sender and on every rank of the lane, and one GPU per process
of a group (NCCL refuses two members on one device).

It differs from ``gloo`` only in the backend and where the slots live; :class:`DeviceC10dTransport`
with ``backend="gloo"`` runs the same device slots through gloo, which shares one GPU between
processes: that is how one GPU checks the device side (tests/gpu_c10d.py registers it).

The sender's slots are cuda_ipc's (cudaMalloc'd, written by device copies on their own stream,
synced before the broadcast is queued); a rank's are its own cudaMalloc'd buffers, read through
the same device views as cuda_ipc's mapped slots. NCCL runs its broadcast on its own stream; a
rank syncs the device after it, before any view of the slot is read.

NCCL's environment (from NCCL's and vLLM's documentation; not verified here):
``NCCL_CUMEM_ENABLE=0`` in a process that also shares memory through legacy CUDA IPC (NCCL's
cuMem allocations and cudaIpc handles do not mix), ``NCCL_SOCKET_IFNAME`` to pin the interface
between hosts, ``NCCL_DEBUG=INFO`` to see which transport NCCL picked.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from ..errors import TransportError
from .base import Capabilities, ExportContext, ImportContext, create_all
from .c10d import C10dExported, C10dImported, C10dSlotWriting
from .cuda_ipc.slots import CudaExportedSlot, DeviceBytes, DeviceSlotReader  # an ImportError without CUDA
from .gloo import slot_fields

if importlib.util.find_spec("torch") is None:  # an ImportError marks the transport unavailable here
    raise ImportError("transport 'nccl' needs torch (a CUDA build); it is not installed here")

NAME = "nccl"


def _torch() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise TransportError("transport 'nccl' needs a CUDA build of torch that sees a GPU; torch.cuda is not available")
    return torch


class DeviceExportedSlot(C10dSlotWriting, CudaExportedSlot):
    def __init__(self, size: int) -> None:
        torch = _torch()
        super().__init__(size)
        self.tensor: Any = torch.as_tensor(DeviceBytes(self.ptr, size, self.device, self), device=f"cuda:{self.device}")

    def descriptor(self) -> dict[str, Any]:
        return {"size": self.size, "direct": 0}  # device slots: every bucket packed, broadcast whole

    def finish(self, used: int) -> list[Any]:
        self.flush()  # the bucket's device copies are done before the broadcast reads the slot
        self.send([self.tensor[:used]] if used else [])
        return []

    def close(self) -> None:
        self.works = []
        self.tensor = None
        super().close()


class DeviceImportedSlot(DeviceSlotReader):
    def __init__(self, size: int, imported: C10dImported) -> None:
        torch = _torch()
        self.device = torch.cuda.current_device()
        self.size = size
        self.memory: Any = torch.zeros(size, dtype=torch.uint8, device=f"cuda:{self.device}")
        self.ptr = int(self.memory.data_ptr())
        self._used = set()
        self._imported = imported

    def receive(
        self, seq: int, pieces: tuple[Any, Any] | None, used: int, check: Callable[[], None], timeout: float,
        into: Any = None,
    ) -> None:
        self._imported.receive(self, seq, pieces, used, check, timeout)  # device memory: always into the slot
        _torch().cuda.synchronize(self.device)  # the collective's stream is done before views read the slot

    def close(self) -> None:
        self.ptr = 0
        self.memory = None


class DeviceC10dTransport:
    def __init__(self, name: str, backend: str) -> None:
        self.name = name
        self.backend = backend
        self.capabilities = Capabilities(
            same_host=False, device="cuda", receives=True, collective=True, network=True, authenticated=False
        )

    def export(self, count: int, size: int, context: ExportContext) -> C10dExported:
        exported = C10dExported(self.backend, [], context)
        exported.slots = create_all(DeviceExportedSlot, count, size)
        for slot in exported.slots:
            slot.exported = exported
        return exported

    def attach(self, descriptors: list[dict[str, Any]], context: ImportContext) -> C10dImported:
        sizes, direct = slot_fields(descriptors, self.name)
        imported = C10dImported(self.backend, [], context, direct)
        imported.slots = [DeviceImportedSlot(size, imported) for size in sizes]
        return imported


TRANSPORT = DeviceC10dTransport(NAME, "nccl")
