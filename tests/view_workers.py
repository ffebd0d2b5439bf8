"""A views rank for test_kept_views: records each view's bytes, shape and dtype, keeps some views
past their bucket and changes others in place, as an engine may, and counts the views it is
handed again (the same object as one it got before, found through weak references, which do not
keep a view alive)."""

from __future__ import annotations

import traceback
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def meddling_rank(endpoint: str, versions: list[str], queue: Any) -> None:
    seen: dict[str, tuple[bytes, tuple[int, ...], str]] = {}
    held: list[np.ndarray] = []  # views kept past their bucket, until the next version's load_weights
    given: dict[int, weakref.ref[np.ndarray]] = {}  # id -> every view handed out before, weakly
    changed: dict[int, weakref.ref[np.ndarray]] = {}  # id -> the views changed in place
    counts = {"again": 0, "held_again": 0, "changed_again": 0}

    def load_weights(weights: Iterable[tuple[str, np.ndarray]]) -> None:
        keeping = list(held)
        held.clear()
        for name, view in weights:
            seen[name] = (view.tobytes(), view.shape, view.dtype.str)
            before = given.get(id(view))
            if before is not None and before() is view:
                counts["again"] += 1
                counts["held_again"] += any(view is h for h in keeping)
                changed_before = changed.get(id(view))
                counts["changed_again"] += changed_before is not None and changed_before() is view
            given[id(view)] = weakref.ref(view)
            k = int(name[1:])
            if k % 7 == 3:
                held.append(view)  # an engine that keeps a view: it must not be handed out again
            elif k % 5 == 1:
                view.shape = (view.size,)  # reshaped in place
            elif k % 11 == 2:
                view.flags.writeable = False
            elif k % 13 == 4:
                view.dtype = np.dtype(np.int32)  # retyped in place
            if k % 7 != 3 and (k % 5 == 1 or k % 11 == 2 or k % 13 == 4):
                changed[id(view)] = weakref.ref(view)

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
