"""Transports: one module (or small package) each, behind the interface in :mod:`.base`.

Adding a transport is one module exposing ``TRANSPORT`` and one line in :data:`TRANSPORTS`
(or one :func:`register` call from outside the package, as the tests' own transport does).
"""

from __future__ import annotations

import importlib

from ..errors import TransportError, UnknownTransport
from .base import (
    BucketWriter,
    Capabilities,
    ExportContext,
    Exported,
    ExportedSlot,
    ImportContext,
    Imported,
    ImportedSlot,
    PushLayout,
    StreamRead,
    StreamSpec,
    Transport,
    check_begin_fields,
    create_all,
    host_digest,
    host_identity,
    refusal,
    security_refusal,
    transfer_spans,
)
from .cuda_ipc.wire import device_identity  # what a rank says of its GPUs in HELLO (imports without CUDA)

# name -> module path; each module exposes ``TRANSPORT`` implementing Transport.
TRANSPORTS: dict[str, str] = {
    "shm": "weightstream.protocol.transports.shm",
    "cuda_ipc": "weightstream.protocol.transports.cuda_ipc.slots",
    "tcp": "weightstream.protocol.transports.tcp",
    "gloo": "weightstream.protocol.transports.gloo",
    "nccl": "weightstream.protocol.transports.nccl",
}

_available: tuple[str, ...] | None = None


def register(name: str, module: str) -> None:
    """Add a transport from outside this package: ``module`` exposes ``TRANSPORT``. Every process
    of a push (sender and ranks) must register it before it is used."""
    global _available
    TRANSPORTS[name] = module
    _available = None


def get_transport(name: str) -> Transport:
    if name not in TRANSPORTS:
        raise UnknownTransport(f"unknown transport {name!r}; expected one of {sorted(TRANSPORTS)}")
    try:
        module = importlib.import_module(TRANSPORTS[name])
    except ImportError as exc:
        hint = "; install its extra: pip install 'weightstream[cuda]'" if "not installed" in str(exc) else ""
        raise TransportError(f"transport {name!r} is unavailable here ({exc}){hint}") from exc
    transport: Transport = module.TRANSPORT
    if transport.name != name:  # ranks offer, and WELCOME names, the transport by this name
        raise TransportError(
            f"transport {name!r}: module {TRANSPORTS[name]} exposes a TRANSPORT named {transport.name!r}; expected "
            f"{name!r}; fix: register it under its own name, or set its name to {name!r}"
        )
    return transport


def available_transports(has_curve: bool | None = None, insecure: bool = False) -> list[str]:
    """Transports this process can use (offered in HELLO); probed once (until a register), since
    a failed probe (e.g. CUDA without a driver) is not cached by the import system. Given
    ``has_curve``, only those that side's security setup allows (see :func:`security_refusal`)."""
    global _available
    if _available is None:
        names = []
        for name in TRANSPORTS:
            try:
                get_transport(name)
            except TransportError:
                continue
            names.append(name)
        _available = tuple(names)
    if has_curve is None:
        return list(_available)
    return [n for n in _available if security_refusal(get_transport(n).capabilities, has_curve, insecure) is None]


__all__ = [
    "TRANSPORTS",
    "BucketWriter",
    "Capabilities",
    "ExportContext",
    "Exported",
    "ExportedSlot",
    "ImportContext",
    "Imported",
    "ImportedSlot",
    "PushLayout",
    "StreamRead",
    "StreamSpec",
    "Transport",
    "available_transports",
    "check_begin_fields",
    "create_all",
    "device_identity",
    "get_transport",
    "host_digest",
    "host_identity",
    "refusal",
    "register",
    "security_refusal",
    "transfer_spans",
]
