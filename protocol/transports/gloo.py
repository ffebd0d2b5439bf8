"""``gloo``: buckets broadcast through a c10d ``ProcessGroupGloo`` made per push (see :mod:`.c10d`),
between host slots: for ranks on other hosts that have torch. Needs ``insecure=True``."""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import numpy as np

from ..errors import TransportError
from .base import Capabilities, ExportContext, ImportContext, create_all
from .c10d import C10dExported, C10dImported, C10dSlotWriting, torch_zeros
from .host import DirectPieces, ReceivingSlot
from .shm.streaming import slot_streams

NAME = "gloo"
# a piece of at least this many bytes is broadcast from the tensor's own memory, not packed first
# (a broadcast costs tens of microseconds: below this, the copy is cheaper)
DIRECT_MIN = 1 << 20

if importlib.util.find_spec("torch") is None:  # an ImportError marks the transport unavailable here
    raise ImportError("transport 'gloo' needs torch (pip install torch); it is not installed here")


class GlooExportedSlot(C10dSlotWriting, DirectPieces):
    def __init__(self, size: int) -> None:
        self.size = size
        self.streams = slot_streams(size)
        self.tensor = torch_zeros(size)
        self._view: np.ndarray = self.tensor.numpy()
        self._mv = memoryview(self._view)

    def host_view(self) -> np.ndarray:
        return self._view

    def descriptor(self) -> dict[str, Any]:
        return {"size": self.size, "direct": self.direct_min}

    def finish(self, used: int) -> list[Any]:
        import torch

        with warnings.catch_warnings():  # a read-only tensor's bytes: the root of a broadcast only reads them
            warnings.simplefilter("ignore", UserWarning)
            self.send([torch.from_numpy(data) for _start, data in self.transfers(used)])
        return []

    def close(self) -> None:
        self.works = []


def slot_fields(descriptors: list[dict[str, Any]], name: str) -> tuple[list[int], int]:
    """The slots' sizes and their one direct_min (see ``transfer_spans``) from WELCOME, checked."""
    sizes, directs = [], set()
    for i, desc in enumerate(descriptors):
        size, direct = desc.get("size"), desc.get("direct")
        if type(size) is not int or not 0 < size <= 1 << 40 or type(direct) is not int or direct < 0 or len(desc) != 2:
            raise TransportError(
                f"{name} slot {i} descriptor: expected {{'size': <positive int>, 'direct': <int >= 0>}}, got {desc!r}"
            )
        sizes.append(size)
        directs.add(direct)
    if len(directs) > 1:
        raise TransportError(f"{name} slot descriptors: expected one 'direct' for every slot, got {sorted(directs)}")
    return sizes, directs.pop() if directs else 0


class GlooTransport:
    name = NAME
    capabilities = Capabilities(same_host=False, device="host", receives=True, collective=True, network=True, authenticated=False)

    def export(self, count: int, size: int, context: ExportContext) -> C10dExported:
        exported = C10dExported(NAME, [], context, DIRECT_MIN)
        exported.slots = create_all(GlooExportedSlot, count, size)
        for slot in exported.slots:
            slot.exported = exported
            slot.direct_min = exported.direct_min
        return exported

    def attach(self, descriptors: list[dict[str, Any]], context: ImportContext) -> C10dImported:
        sizes, direct = slot_fields(descriptors, NAME)
        imported = C10dImported(NAME, [], context, direct)
        imported.slots = [ReceivingSlot(size, imported, slot_streams(size), torch_zeros(size)) for size in sizes]
        return imported


TRANSPORT = GlooTransport()
