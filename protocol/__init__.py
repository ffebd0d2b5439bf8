"""What sender and receivers agree on: messages, codec, dtypes, errors, transports."""

from .errors import (
    ConfigError,
    ManifestMismatch,
    PeerLost,
    PeerTimeout,
    ProtocolError,
    RemoteError,
    TransportError,
    VersionAborted,
    WeightstreamError,
)
from .messages import ALIGNMENT, PROTOCOL_VERSION, Codec, decode, encode

__all__ = [
    "ALIGNMENT",
    "PROTOCOL_VERSION",
    "Codec",
    "ConfigError",
    "ManifestMismatch",
    "PeerLost",
    "PeerTimeout",
    "ProtocolError",
    "RemoteError",
    "TransportError",
    "VersionAborted",
    "WeightstreamError",
    "decode",
    "encode",
]
