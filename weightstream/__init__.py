"""weightstream: stream model weights from a trainer into inference ranks.

    from weightstream import BucketSender, ReceiverDaemon
"""

from .protocol.errors import (
    ConfigError,
    CorruptSnapshot,
    IdentityRefused,
    ManifestMismatch,
    PeerLost,
    PeerTimeout,
    ProtocolError,
    RankInUse,
    RemoteError,
    TransportError,
    UnknownTransport,
    VersionAborted,
    WeightstreamError,
)
from .receiver.daemon import DaemonStatus, ReceiverDaemon, VersionRecord
from .security import CurveKeys
from .sender.bucket_sender import BucketSender, PushReport, ReceiverResult

__version__ = "0.1.0"

__all__ = [
    "BucketSender",
    "ConfigError",
    "CorruptSnapshot",
    "CurveKeys",
    "DaemonStatus",
    "IdentityRefused",
    "ManifestMismatch",
    "PeerLost",
    "PeerTimeout",
    "ProtocolError",
    "PushReport",
    "RankInUse",
    "ReceiverDaemon",
    "ReceiverResult",
    "RemoteError",
    "TransportError",
    "UnknownTransport",
    "VersionAborted",
    "VersionRecord",
    "WeightstreamError",
]
