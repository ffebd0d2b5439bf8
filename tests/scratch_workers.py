"""A views rank for test_scratch: records each tensor's bytes and where its view points."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from view_workers import serve_views


def views_rank(endpoint: str, versions: list[str], queue: Any) -> None:
    seen: dict[str, tuple[bytes, int]] = {}
    stale: list[np.ndarray] = []  # every view, kept past its validity: memory freed is never what is reused

    def load_weights(weights: Iterable[tuple[str, np.ndarray]]) -> None:
        for name, view in weights:
            seen[name] = (view.tobytes(), int(view.__array_interface__["data"][0]))
            stale.append(view)

    def report() -> dict[str, tuple[bytes, int]]:
        out = dict(seen)
        seen.clear()
        return out

    serve_views(endpoint, load_weights, versions, queue, report)
