"""The one error hierarchy of weightstream.

Every error says what was expected, what came, and how to fix it. Errors that
happen on a remote peer travel as an ERROR/FAILED/REJECT message carrying the
class name and message, and are rebuilt here by name with :func:`from_wire`.
"""

from __future__ import annotations

from typing import Any


class WeightstreamError(Exception):
    """Base class of every error weightstream raises on purpose."""

    #: rank of the receiver the error came from, when it is a remote error
    rank: int | None = None
    #: a failed ``push`` attaches its PushReport: every rank's outcome
    report: Any = None

    def __init__(self, message: str, *, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class ConfigError(WeightstreamError, ValueError):
    """A configuration mistake: an argument that cannot work (a size, a rank, an endpoint, a key, a
    transport name). Raised before anything starts; also a ValueError, as Python's own are."""


class ProtocolError(WeightstreamError):
    """A message broke the wire protocol (bad type, missing field, out of range)."""

    #: the offending message's ``type`` when it could be read
    msg_type: str | None = None


class ManifestMismatch(WeightstreamError):
    """A receiver's model does not match the manifest of a version."""


class TransportError(WeightstreamError):
    """A transport could not create, export or map a bucket slot."""


class UnknownTransport(ConfigError, TransportError):
    """``transport=`` names no registered transport: a configuration mistake, and a TransportError
    as it always was (code that falls back on TransportError keeps working)."""


class PeerTimeout(WeightstreamError):
    """A peer did not answer within the configured time."""


class PeerLost(WeightstreamError):
    """A peer stopped heart-beating, disconnected, or restarted mid-version."""


class VersionAborted(WeightstreamError):
    """A version was aborted before every receiver committed it."""


class RankInUse(WeightstreamError):
    """A rank was claimed while another live connection holds it (a duplicate daemon, say)."""


class IdentityRefused(WeightstreamError):
    """A peer claimed a rank its credentials do not allow (allowed_clients maps keys to ranks)."""


class CorruptSnapshot(WeightstreamError):
    """A snapshot part's data does not match the xxh3 digests written with it."""


class RemoteError(WeightstreamError):
    """A receiver's ``load_weights`` (or sink) raised; carries the original type name."""

    def __init__(self, message: str, *, rank: int | None = None, remote_type: str = "Exception") -> None:
        super().__init__(message, rank=rank)
        self.remote_type = remote_type


_BY_NAME: dict[str, type[WeightstreamError]] = {
    cls.__name__: cls
    for cls in (
        WeightstreamError,
        ConfigError,
        ProtocolError,
        ManifestMismatch,
        TransportError,
        PeerTimeout,
        PeerLost,
        VersionAborted,
        RankInUse,
        IdentityRefused,
        CorruptSnapshot,
        RemoteError,
    )
}


def wire_name(exc: BaseException) -> str:
    """The name an exception travels under: our own class name, else ``RemoteError``."""
    return type(exc).__name__ if type(exc).__name__ in _BY_NAME else "RemoteError"


def from_wire(name: str, message: str, *, rank: int | None) -> WeightstreamError:
    """Rebuild a remote error by name; unknown names become :class:`RemoteError`."""
    cls = _BY_NAME.get(name)
    prefix = f"rank {rank}: " if rank is not None else ""
    if cls is None or cls is RemoteError:
        return RemoteError(prefix + message, rank=rank, remote_type=name)
    return cls(prefix + message, rank=rank)
