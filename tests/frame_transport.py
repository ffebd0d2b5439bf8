"""A transport for the tests that moves bucket bytes as data frames beside the BUCKET message.

It shows the seam without any cross-host code: each side keeps a private buffer per slot (no
shared memory), the sender's writer hands the bucket's bytes to the publisher as frames, and a
rank copies them into its own buffer before it slices views. Registered with one line
(:func:`register`, which the rank processes of the tests run too, via workers.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from weightstream import native
from weightstream.frameworks import host_bytes, view_as
from weightstream.protocol.dtypes import DType
from weightstream.protocol.errors import ProtocolError, TransportError
from weightstream.protocol.transports import base, register

NAME = "frames"
FRAME_BYTES = 64 << 10  # small, so a test bucket takes several frames


class FrameExportedSlot(base.SlotWriter):
    def __init__(self, size: int) -> None:
        self.size = size
        self.buf = np.zeros(size, np.uint8)

    def descriptor(self) -> dict[str, Any]:
        return {"size": self.size}

    def source_bytes(self, tensor: Any) -> np.ndarray:
        return host_bytes(tensor)

    def write(self, offset: int, source: np.ndarray, start: int, nbytes: int) -> None:
        self.buf[offset : offset + nbytes] = source[start : start + nbytes]

    def finish(self, used: int) -> list[Any]:
        # copies: the slot may be written again once every rank acked, whatever ZMQ still holds
        return [self.buf[at : min(at + FRAME_BYTES, used)].tobytes() for at in range(0, used, FRAME_BYTES)]

    def digest(self, nbytes: int) -> int:
        return base.host_digest(self.buf[:nbytes])

    def close(self) -> None:
        pass


class FrameImportedSlot(base.SlotReader):
    domain = "host"
    streams = False

    def __init__(self, descriptor: dict[str, Any]) -> None:
        size = descriptor.get("size")
        if type(size) is not int or not 0 < size <= 1 << 34:
            raise TransportError(f"frames slot descriptor: expected a positive 'size', got {size!r}")
        self.size = size
        self.buf = np.zeros(size, np.uint8)
        self.received = 0  # bytes the last bucket's frames filled: nothing past them is read

    def accept(self, frames: list[Any]) -> None:
        at = self.received = 0
        for frame in frames:
            data = np.frombuffer(frame, np.uint8)
            if at + data.nbytes > self.size:
                raise ProtocolError(
                    f"BUCKET: data frames: expected at most the slot's {self.size} bytes, got more than {at + data.nbytes}"
                )
            self.buf[at : at + data.nbytes] = data
            at += data.nbytes
        self.received = at

    def raw(self, offset: int, nbytes: int) -> np.ndarray:
        if offset + nbytes > self.received and nbytes:
            raise ProtocolError(
                f"BUCKET: bytes {offset}..{offset + nbytes} of the slot: expected them in the bucket's data frames, "
                f"which held {self.received} bytes"
            )
        return self.buf[offset : offset + nbytes]

    def typed(self, framework: str, buffer: np.ndarray, dtype: DType, shape: tuple[int, ...]) -> Any:
        return view_as(framework, buffer, dtype, shape)  # type: ignore[arg-type]

    def scratch(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, np.uint8)

    def copy(self, dst: np.ndarray, at: int, src: np.ndarray) -> None:
        native.copy(dst[at : at + src.nbytes], src, False)

    def sync(self) -> None:
        pass

    def digest(self, nbytes: int) -> int:
        return base.host_digest(self.buf[:nbytes])

    def close(self) -> None:
        pass


class FrameTransport(base.NoFields):
    name = NAME
    capabilities = base.Capabilities(same_host=False, device="host", data_frames=True)

    def create_slots(self, count: int, size: int, session: str = "") -> list[FrameExportedSlot]:
        return base.create_all(FrameExportedSlot, count, size)

    def open_slot(
        self, descriptor: dict[str, Any], owner: tuple[int, str] | None = None, insecure: bool = False
    ) -> FrameImportedSlot:
        return FrameImportedSlot(descriptor)


TRANSPORT = FrameTransport()

register(NAME, __name__)


class FieldsFrameTransport(FrameTransport):
    """The frame transport with per-push BEGIN fields, as a collective's store address would be:
    the sender says how many ranks the push has and names its group, each rank checks it is one
    of them (what ``join`` saw is kept in ``joined`` for the tests)."""

    name = "frames_fields"

    def __init__(self) -> None:
        self.joined: list[tuple[int, dict[str, Any] | None]] = []

    def begin_fields(self, slots: list[Any], ranks: list[int]) -> dict[str, Any] | None:
        return {"world": len(ranks), "group": f"push-{ranks[0]}-{ranks[-1]}"} if ranks else None

    def join(self, slots: list[Any], fields: dict[str, Any] | None, rank: int) -> None:
        world = fields.get("world") if fields is not None else None
        if type(world) is not int or not 0 <= rank < world:
            raise ProtocolError(f"BEGIN: field 'transport': expected a 'world' above this rank ({rank}), got {fields!r}")
        self.joined.append((rank, fields))


FIELDS_TRANSPORT = FieldsFrameTransport()
