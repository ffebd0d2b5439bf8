"""The inference-rank side: the daemon, prefetch queue, slicing and sinks."""

from .daemon import DaemonStatus, ReceiverDaemon
from .manifest import check_manifest

__all__ = ["DaemonStatus", "ReceiverDaemon", "check_manifest"]
