"""A views rank for test_kept_views: records each view's bytes, shape, dtype, writability and
identity, keeps some views past their bucket, changes others in place and puts finalizers
(weak references) on others, as an engine may."""

from __future__ import annotations

import traceback
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def meddling_rank(endpoint: str, versions: list[str], queue: Any) -> None:
    seen: dict[str, tuple[bytes, tuple[int, ...], str, bool, int]] = {}
    held: list[np.ndarray] = []  # views kept past their bucket, until the next version's load_weights
    counts = {"held_again": 0, "weak": 0, "finalized": 0}

    def finalized() -> None:
        counts["finalized"] += 1

    def load_weights(weights: Iterable[tuple[str, np.ndarray]]) -> None:
        keeping = list(held)
        held.clear()
        for name, view in weights:
            seen[name] = (view.tobytes(), view.shape, view.dtype.str, bool(view.flags.writeable), id(view))
            counts["held_again"] += any(view is h for h in keeping)
            k = int(name[1:])
            if k % 7 == 3:
                held.append(view)  # an engine that keeps a view: it must not be handed out again
            elif k % 5 == 1:
                view.shape = (view.size,)  # reshaped in place
            elif k % 11 == 2:
                view.flags.writeable = False
            elif k % 13 == 4:
                view.dtype = np.dtype(np.int32)  # retyped in place
            elif k % 17 == 6:
                weakref.finalize(view, finalized)  # must run once the engine lets the view go
                counts["weak"] += 1

    def report() -> Any:
        out = (dict(seen), dict(counts))
        seen.clear()
        counts.update(dict.fromkeys(counts, 0))
        return out

    serve_views(endpoint, load_weights, versions, queue, report)


def serve_views(
    endpoint: str, load_weights: Callable[[Iterable[tuple[str, np.ndarray]]], None], versions: list[str], queue: Any,
    report: Callable[[], Any],
) -> None:
    """A NumPy views rank running ``load_weights``: ("started", None) on ``queue`` once it runs,
    then ``(version, report())`` as each of ``versions`` commits; a crash is put there too,
    never a hang."""
    from weightstream import ReceiverDaemon

    try:
        daemon = ReceiverDaemon(endpoint, load_weights, rank=0, framework="numpy", prefetch=2)
        daemon.start()
        try:
            queue.put(("started", None))
            for version in versions:
                daemon.wait_for_version(version, timeout=60)
                queue.put((version, report()))
        finally:
            daemon.stop()
    except BaseException as exc:  # reported, never a hang
        queue.put(("crashed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
