"""``gloo``: buckets broadcast through a c10d ``ProcessGroupGloo`` made per push (see :mod:`.c10d`),
between host slots: for ranks on other hosts that have torch. Needs ``insecure=True``."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np

from .base import Capabilities, ExportContext, ImportContext, create_all
from .c10d import C10dExported, C10dImported, C10dSlotWriting, torch_zeros
from .host import HostSlotReader, HostSlotWriter
from .shm.streaming import slot_streams

NAME = "gloo"

if importlib.util.find_spec("torch") is None:  # an ImportError marks the transport unavailable here
    raise ImportError("transport 'gloo' needs torch (pip install torch); it is not installed here")


class GlooExportedSlot(C10dSlotWriting, HostSlotWriter):
    def __init__(self, size: int) -> None:
        self.size = size
        self.streams = slot_streams(size)
        self.tensor = torch_zeros(size)
        self._view: np.ndarray = self.tensor.numpy()
        self._mv = memoryview(self._view)

    def host_view(self) -> np.ndarray:
        return self._view

    def descriptor(self) -> dict[str, Any]:
        return {"size": self.size}

    def finish(self, used: int) -> list[Any]:
        self.send(used)
        return []

    def close(self) -> None:
        self.work = None


class GlooImportedSlot(HostSlotReader):
    def __init__(self, size: int, imported: C10dImported) -> None:
        self.size = size
        self.streams = slot_streams(size)
        self.tensor = torch_zeros(size)
        self._view: np.ndarray = self.tensor.numpy()
        self._imported = imported

    def host_view(self) -> np.ndarray:
        return self._view

    def receive(self, seq: int, used: int, check: Callable[[], None], timeout: float) -> None:
        self._imported.receive(self.tensor, seq, used, check, timeout)

    def close(self) -> None:
        pass


def slot_sizes(descriptors: list[dict[str, Any]], name: str) -> list[int]:
    from ..errors import TransportError

    sizes = []
    for i, desc in enumerate(descriptors):
        size = desc.get("size")
        if type(size) is not int or not 0 < size <= 1 << 40 or len(desc) != 1:
            raise TransportError(f"{name} slot {i} descriptor: expected {{'size': <positive int>}}, got {desc!r}")
        sizes.append(size)
    return sizes


class GlooTransport:
    name = NAME
    capabilities = Capabilities(same_host=False, device="host", receives=True, collective=True, network=True, authenticated=False)

    def export(self, count: int, size: int, context: ExportContext) -> C10dExported:
        exported = C10dExported(NAME, [], context)
        exported.slots = create_all(GlooExportedSlot, count, size)
        for slot in exported.slots:
            slot.exported = exported
        return exported

    def attach(self, descriptors: list[dict[str, Any]], context: ImportContext) -> C10dImported:
        sizes = slot_sizes(descriptors, NAME)
        imported = C10dImported(NAME, [], context)
        imported.slots = [GlooImportedSlot(size, imported) for size in sizes]
        return imported


TRANSPORT = GlooTransport()
