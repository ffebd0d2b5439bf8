"""The transport interface: how bucket slots are created, described and mapped.

A transport is one module that provides both sides: the sender's *exported*
slots (it owns and frees the memory) and the receiver's *imported* mappings of
them. Only a small map of scalars (the slot descriptor) crosses the wire.
Adding a transport means adding one module and one line in :data:`TRANSPORTS`.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np

from .errors import TransportError


class ExportedSlot(Protocol):
    """A slot on the sender side: owns the memory."""

    size: int

    def descriptor(self) -> dict[str, Any]: ...
    def host_view(self) -> np.ndarray: ...  # writable 1-D uint8 view over the slot
    def close(self) -> None: ...


class ImportedSlot(Protocol):
    """A slot mapped on the receiver side: never frees the sender's memory."""

    size: int

    def host_view(self) -> np.ndarray: ...
    def close(self) -> None: ...


class Transport(Protocol):
    name: str

    def create_slots(self, count: int, size: int) -> list[ExportedSlot]: ...
    def open_slot(self, descriptor: dict[str, Any]) -> ImportedSlot: ...


# name -> module path; each module exposes ``TRANSPORT`` implementing Transport.
TRANSPORTS: dict[str, str] = {
    "shm": "weightstream.protocol.shm",
    "cuda_ipc": "weightstream.protocol.cuda_ipc",
}


def get_transport(name: str) -> Transport:
    if name not in TRANSPORTS:
        raise TransportError(f"unknown transport {name!r}; expected one of {sorted(TRANSPORTS)}")
    try:
        module = importlib.import_module(TRANSPORTS[name])
    except ImportError as exc:
        raise TransportError(
            f"transport {name!r} is unavailable here ({exc}); install its extra, e.g. pip install 'weightstream[cuda]'"
        ) from exc
    return module.TRANSPORT  # type: ignore[no-any-return]


def available_transports() -> list[str]:
    """Transports this process can import (offered in HELLO)."""
    names = []
    for name in TRANSPORTS:
        try:
            get_transport(name)
        except TransportError:
            continue
        names.append(name)
    return names
