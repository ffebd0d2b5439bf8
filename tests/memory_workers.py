"""Spawned processes that measure their own peak RSS while streaming (Linux /proc)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

MiB = 1 << 20


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM (peak RSS) := current RSS


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def tensor_of(index: int, nbytes: int) -> np.ndarray:
    return np.full(nbytes, (index + 1) % 256, dtype=np.uint8)


def lazy_sender(endpoint: str, count: int, nbytes: int, bucket: int, out: Any) -> None:
    """Push ``count`` tensors made on demand; report the peak RSS growth of the push."""
    from weightstream import BucketSender

    specs = {f"layers.{i}.w": ("uint8", (nbytes,)) for i in range(count)}

    def make() -> Iterator[tuple[str, np.ndarray]]:
        for i in range(count):
            yield f"layers.{i}.w", tensor_of(i, nbytes)  # a fresh allocation, like a gathered shard

    with BucketSender(endpoint, receivers=1, bucket_bytes=bucket, num_buffers=2, timeout=60) as sender:
        sender.wait_for_receivers(timeout=60)
        reset_peak()
        base = peak_rss()
        sender.push(make(), version="v1", specs=specs)
        out.put(("sender", peak_rss() - base))


def preallocated_receiver(endpoint: str, count: int, nbytes: int, out: Any, mode: str = "direct") -> None:
    """A NumPy model allocated and touched up front; report peak RSS growth while receiving.
    ``mode``: "direct" (NumpySink) or "views" (a plain load_weights copying each view, as engines do)."""
    from weightstream import ReceiverDaemon
    from weightstream.receiver.sinks import NumpySink

    state = {f"layers.{i}.w": np.zeros(nbytes, np.uint8) for i in range(count)}
    for array in state.values():
        array.fill(0)  # touch every page: only the transfer's own memory may grow

    def load_weights(weights: Any) -> None:
        for name, view in weights:
            np.copyto(state[name], view)

    sink: Any = NumpySink(state) if mode == "direct" else load_weights
    daemon = ReceiverDaemon(endpoint, sink, rank=0, framework="numpy").start()
    try:
        reset_peak()
        base = peak_rss()
        daemon.wait_for_version("v1", timeout=120)
        growth = peak_rss() - base
        exact = all(np.all(state[f"layers.{i}.w"] == (i + 1) % 256) for i in range(count))
        out.put(("receiver", growth, exact))
    finally:
        daemon.stop()
