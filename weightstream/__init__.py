"""weightstream: stream model weights from a trainer into inference ranks.

    from weightstream import BucketSender, ReceiverDaemon
"""

from .protocol.errors import (
    ManifestMismatch,
    PeerLost,
    PeerTimeout,
    ProtocolError,
    RemoteError,
    TransportError,
    VersionAborted,
    WeightstreamError,
)
from .protocol.security import CurveKeys
from .receiver.daemon import DaemonStatus, ReceiverDaemon
from .sender.bucket_sender import BucketSender, PushReport

__version__ = "0.1.0"

__all__ = [
    "BucketSender",
    "CurveKeys",
    "DaemonStatus",
    "ManifestMismatch",
    "PeerLost",
    "PeerTimeout",
    "ProtocolError",
    "PushReport",
    "ReceiverDaemon",
    "RemoteError",
    "TransportError",
    "VersionAborted",
    "WeightstreamError",
]
