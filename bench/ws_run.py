"""The weightstream side of the bench, through the public API only."""

from __future__ import annotations

from typing import Any

import numpy as np

from weightstream import BucketSender, ReceiverDaemon
from weightstream.receiver.sinks import NumpySink


def make_setup(bucket: int, buffers: int, checksum: bool = False) -> Any:
    def setup(workdir: str, receivers: int) -> BucketSender:
        return BucketSender(f"ipc://{workdir}/ws/s.sock", receivers=receivers, bucket_bytes=bucket,
                            num_buffers=buffers, timeout=600.0, checksum=checksum)

    return setup


def make_sender(model: Any) -> Any:
    def send_version(sender: BucketSender, version: int) -> None:
        sender.push(model.tensors, version=f"v{version}")

    return send_version


def teardown(sender: BucketSender) -> None:
    sender.close()


def receive(workdir: str, rank: int, model: dict[str, np.ndarray], options: dict[str, Any],
            versions: int, report: Any, ready: Any) -> None:
    daemon = ReceiverDaemon(f"ipc://{workdir}/ws/s.sock", NumpySink(model), rank=rank,
                            prefetch=int(options.get("prefetch", 2)))
    serve(daemon, versions, report, ready)


def serve(daemon: ReceiverDaemon, versions: int, report: Any, ready: Any) -> None:
    """Start ``daemon``, say ready, report each of ``versions`` once committed, stop."""
    daemon.start()
    ready()
    try:
        for v in range(versions):
            daemon.wait_for_version(f"v{v}", timeout=600.0)
            report(v)
    finally:
        daemon.stop()
