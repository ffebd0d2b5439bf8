"""A views rank for test_scratch: records each tensor's bytes and where its view points."""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from typing import Any

import numpy as np


def views_rank(endpoint: str, versions: list[str], queue: Any) -> None:
    from weightstream import ReceiverDaemon

    seen: dict[str, tuple[bytes, int]] = {}
    stale: list[np.ndarray] = []  # every view, kept past its validity: memory freed is never what is reused

    def load_weights(weights: Iterable[tuple[str, np.ndarray]]) -> None:
        for name, view in weights:
            seen[name] = (view.tobytes(), int(view.__array_interface__["data"][0]))
            stale.append(view)

    try:
        daemon = ReceiverDaemon(endpoint, load_weights, rank=0, framework="numpy", prefetch=2)
        daemon.start()
        try:
            queue.put(("started", None))
            for version in versions:
                daemon.wait_for_version(version, timeout=60)
                queue.put((version, dict(seen)))
                seen.clear()
        finally:
            daemon.stop()
    except BaseException as exc:  # reported, never a hang
        queue.put(("crashed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
