"""The transport interface: how bucket slots are created, described and mapped.

A transport is one module that provides both sides: the sender's *exported*
slots (it owns and frees the memory) and the receiver's *imported* mappings of
them. Only a small map of scalars (the slot descriptor) crosses the wire.
Adding a transport means adding one module and one line in :data:`TRANSPORTS`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ..dtypes import DType
from ..errors import TransportError


class ExportedSlot(Protocol):
    """A slot on the sender side: owns the memory."""

    size: int

    def descriptor(self) -> dict[str, Any]: ...
    def source_bytes(self, tensor: Any) -> Any: ...  # flat uint8 view of a tensor, in this slot's memory domain
    def write(self, offset: int, source: Any, start: int, nbytes: int) -> None: ...
    # whole tensors at offsets; the index of one whose byte size is not nbytes[i], else None
    def write_tensors(self, offsets: list[int], tensors: list[Any], nbytes: list[int]) -> int | None: ...
    def flush(self) -> None: ...  # make every write visible to receivers before the bucket is published
    def digest(self, nbytes: int) -> int: ...  # xxh3_64 (or a device digest) of bytes [0, nbytes)
    def close(self) -> None: ...


def write_tensors(slot: ExportedSlot, offsets: list[int], tensors: list[Any], nbytes: list[int]) -> int | None:
    """The generic ``write_tensors``: one ``source_bytes`` and one ``write`` per tensor."""
    for i, (offset, tensor, n) in enumerate(zip(offsets, tensors, nbytes)):
        source = slot.source_bytes(tensor)
        if source.nbytes != n:
            return i
        if n:
            slot.write(offset, source, 0, n)
    return None


class ImportedSlot(Protocol):
    """A slot mapped on the receiver side: never frees the sender's memory."""

    size: int
    domain: str  # "host" for CPU memory; chunks then go straight into a sink's destination
    streams: bool  # host copies out of it bypass the cache (see :mod:`.streaming`)

    def raw(self, offset: int, nbytes: int) -> Any: ...  # flat uint8 view into the slot
    def typed(self, framework: str, buffer: Any, dtype: DType, shape: tuple[int, ...]) -> Any: ...
    def scratch(self, nbytes: int) -> Any: ...  # a private flat uint8 buffer in the same domain
    def copy(self, dst: Any, at: int, src: Any) -> None: ...  # dst[at:at+len(src)] = src
    def sync(self) -> None: ...  # consumer copies out of the slot are complete (before ACK)
    def digest(self, nbytes: int) -> int: ...  # same function as the exporter's digest
    def close(self) -> None: ...


class Transport(Protocol):
    name: str

    # ``session``: the sender's session id; a transport that names its memory puts it in the name
    def create_slots(self, count: int, size: int, session: str = "") -> list[ExportedSlot]: ...
    # ``owner``: (pid, session) of the sender the rank is connected to; ``insecure`` skips the
    # checks that the memory belongs to this rank's user
    def open_slot(
        self, descriptor: dict[str, Any], owner: tuple[int, str] | None = None, insecure: bool = False
    ) -> ImportedSlot: ...


# name -> module path; each module exposes ``TRANSPORT`` implementing Transport.
TRANSPORTS: dict[str, str] = {
    "shm": "weightstream.protocol.transports.shm",
    "cuda_ipc": "weightstream.protocol.transports.cuda_ipc.slots",
}


SlotT = TypeVar("SlotT", bound=ExportedSlot)


def create_all(make: Callable[[int], SlotT], count: int, size: int) -> list[SlotT]:
    """Create ``count`` slots, or none: a failure frees the ones already made."""
    slots: list[SlotT] = []
    try:
        for _ in range(count):
            slots.append(make(size))
    except BaseException:
        for slot in slots:
            slot.close()
        raise
    return slots


def get_transport(name: str) -> Transport:
    if name not in TRANSPORTS:
        raise TransportError(f"unknown transport {name!r}; expected one of {sorted(TRANSPORTS)}")
    try:
        module = importlib.import_module(TRANSPORTS[name])
    except ImportError as exc:
        hint = "; install its extra: pip install 'weightstream[cuda]'" if "not installed" in str(exc) else ""
        raise TransportError(f"transport {name!r} is unavailable here ({exc}){hint}") from exc
    return module.TRANSPORT  # type: ignore[no-any-return]


@functools.cache
def _probe_transports() -> tuple[str, ...]:
    names = []
    for name in TRANSPORTS:
        try:
            get_transport(name)
        except TransportError:
            continue
        names.append(name)
    return tuple(names)


def available_transports() -> list[str]:
    """Transports this process can use (offered in HELLO); probed once per process,
    since a failed probe (e.g. CUDA without a driver) is not cached by the import system."""
    return list(_probe_transports())

