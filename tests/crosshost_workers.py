"""Rank processes for the cross-host tests: one daemon each, reporting per version the xxh3 digest
of every tensor's raw bytes (bit-exact checks) and, on request, that torch was never imported."""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any


def digests(named: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (dtype name, shape, xxh3_64 of the raw bytes) of NumPy arrays."""
    import xxhash

    return {
        name: (a.dtype.name, tuple(a.shape), xxhash.xxh3_64_intdigest(a.reshape(-1).view("uint8").tobytes()))
        for name, a in named.items()
    }


def rank_main(endpoint: str, rank: int, versions: list[str], queue: Any, options: dict[str, Any]) -> None:
    """Serve ``versions``; report "started", per version "committed"/"failed", then "done".

    options: insecure, host_id, curve ((public, secret), server_key), block_torch (torch cannot be
    imported here, as on a Paddle- or NumPy-only rank), framework, slow (seconds per tensor while
    loading ``slow_version``, with an "applying" report at its first tensor)."""
    try:
        if options.get("block_torch"):
            sys.modules["torch"] = None  # type: ignore[assignment]  # import torch now raises ImportError
        from weightstream import CurveKeys, ReceiverDaemon, WeightstreamError
        from weightstream.frameworks import host_bytes

        framework = options.get("framework", "numpy")
        held: dict[str, Any] = {}
        slow, slow_version = options.get("slow", 0.0), options.get("slow_version")
        current: list[str] = [""]

        def load_weights(it: Any) -> None:
            first = True
            for name, tensor in it:
                if slow and current[0] == slow_version:
                    if first:
                        queue.put({"event": "applying", "rank": rank, "version": current[0]})
                        first = False
                    time.sleep(slow)
                raw = host_bytes(tensor).copy()
                held[name] = (raw, str(tensor.dtype), tuple(tensor.shape))

        curve = options.get("curve")
        kwargs: dict[str, Any] = {}
        if curve is not None:
            (public, secret), server_key = curve
            kwargs = {"curve_keys": CurveKeys(public, secret), "server_key": server_key}
        daemon = ReceiverDaemon(
            endpoint, load_weights, rank=rank, framework=framework, heartbeat_interval=0.2, heartbeat_timeout=5.0,
            insecure=bool(options.get("insecure")), host_id=options.get("host_id"), **kwargs,
        )
        daemon.start()
        queue.put({"event": "started", "rank": rank})
        try:
            for version in versions:
                current[0] = version
                try:
                    daemon.wait_for_version(version, timeout=float(options.get("wait", 60.0)))
                except WeightstreamError as exc:
                    queue.put({"event": "failed", "rank": rank, "version": version, "error": type(exc).__name__,
                               "message": str(exc)})
                    continue
                import xxhash

                got = {n: (dt, shape, xxhash.xxh3_64_intdigest(raw.tobytes())) for n, (raw, dt, shape) in held.items()}
                queue.put({"event": "committed", "rank": rank, "version": version, "digests": got})
        finally:
            daemon.stop()
        queue.put({"event": "done", "rank": rank, "torch": "torch" in sys.modules and sys.modules["torch"] is not None})
    except BaseException as exc:
        queue.put({"event": "crashed", "rank": rank, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()})
