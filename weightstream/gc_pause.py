"""Pause Python's cyclic garbage collector around bulk metadata work.

Building or parsing a 100k-tensor manifest allocates a few hundred thousand small
lists and tuples. Every 700 allocations the collector scans the young generation
and, as survivors pile up, the older ones too: measured here, that doubles or
triples the cost of the work itself (msgpack's documentation gives the same
advice for large messages). None of these objects form reference cycles, so
deferring collection loses nothing. Pauses nest and may overlap across threads;
the collector comes back on when the last one ends, if it was on before the first.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
